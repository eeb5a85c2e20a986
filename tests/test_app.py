"""The first app: builds on a pico bundle; its helper shows normalised weights and anchors."""

import gradio as gr
import pytest

import app
from hoe_core.bundle import load_bundle


@pytest.fixture(scope="module")
def loaded(pico_bundle):
    return load_bundle(pico_bundle, device="cpu")


def test_describe_weights_normalises_and_names_active_anchors(loaded):
    text = app.describe_weights(loaded, [2, 5, 3])
    assert "**helpful** 0.20" in text and "**harmless** 0.50" in text
    assert "center 0.60" in text and "helpful" not in text.split("Active")[1]


def test_describe_weights_rejects_all_zero(loaded):
    with pytest.raises(ValueError, match="not all be zero"):
        app.describe_weights(loaded, [0, 0, 0])


def test_build_demo_exposes_a_named_generate_endpoint(loaded):
    demo = app.build_demo(loaded)
    assert isinstance(demo, gr.Blocks)
    names = [d.api_name for d in demo.fns.values()]
    assert "generate" in names
