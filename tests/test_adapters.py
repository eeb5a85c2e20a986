"""Experts are standard peft adapters: plain PeftModel loads them and adds exactly B A."""

import numpy as np
import torch
from peft import PeftModel
from torch.testing import assert_close

from hoe_core.experts.adapters import load_lora_adapter, save_lora_adapter
from hoe_core.experts.task_svd import LowRankDelta
from hoe_core.pico import random_experts


def test_peft_loads_our_adapter_with_mixed_ranks(pico_model, pico_dir, tmp_path):
    expert = random_experts(pico_model, np.eye(1), rank=4, seed=3)[0]
    name = "model.layers.1.mlp.down_proj"
    f = expert.factors[name]
    expert.factors[name] = LowRankDelta(B=f.B[:, :2], A=f.A[:2])  # a different rank here
    save_lora_adapter(expert.factors, tmp_path / "a", dtype=torch.float32)

    loaded = load_lora_adapter(tmp_path / "a")
    assert loaded[name].A.shape[0] == 2 and loaded[name].scale == 1.0
    for module, delta in expert.factors.items():
        assert_close(loaded[module].dense(), delta.dense(), atol=1e-6, rtol=1e-6)

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(pico_dir), dtype=torch.float32)
    reference = {n: p.detach().clone() for n, p in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(tmp_path / "a")).merge_and_unload()
    for module, delta in expert.factors.items():
        got = merged.state_dict()[f"{module}.weight"] - reference[f"{module}.weight"]
        assert_close(got, delta.dense(), atol=1e-5, rtol=1e-5)
