"""Shared fixtures: pico Llama backbones and bundles built offline in tmp folders."""

from __future__ import annotations

import os
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hoe_core.pico import build_pico_bundle, random_experts, save_pico_backbone  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def pico_dir(tmp_path_factory):
    """An HF folder with a pico Llama (2 layers, hidden 32) and a byte tokenizer."""
    return save_pico_backbone(tmp_path_factory.mktemp("pico") / "backbone")


@pytest.fixture()
def pico_model(pico_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(pico_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def pico_tokenizer(pico_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pico_dir))
    tok.padding_side = "left"
    return tok


@pytest.fixture()
def three_experts(pico_model):
    """Random LoRA experts at the three vertices of the 3-objective simplex."""
    return random_experts(pico_model, np.eye(3), rank=4, seed=1)


@pytest.fixture(scope="session")
def pico_bundle(tmp_path_factory):
    """A complete pico bundle (3 objectives, 3 experts, 1 router) in a session tmp dir."""
    return build_pico_bundle(tmp_path_factory.mktemp("bundles") / "pico")


@contextmanager
def trainable_gates(layers):
    """The differentiable reference path for ``layers`` (HoE layers) inside the block: a
    layer takes it when grad is on and a gate needs grad, and served gates are frozen, so a
    plain ``layer(x)`` with grad on would run the inference kernel again."""
    gates = [t for layer in layers for t in layer.gates.parameters()]
    before = [t.requires_grad for t in gates]
    for t in gates:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t, flag in zip(gates, before):
            t.requires_grad_(flag)
