"""Run the sampling and router-training loops in every process of an ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/accelerate_loops.py BACKBONE OUT

Writes OUT/samples (the shared sample cache) and OUT/router_rank<i>.safetensors (each
process's router after training), for tests/test_distributed.py to compare.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hoe_core.pico import random_experts, random_router
from hoe_core.routing.model import HoEModel
from hoe_core.training import distributed
from hoe_core.training.routers import RouterTrainingConfig, train_router
from hoe_core.training.sampling import SamplingConfig, sample_responses

PROMPTS = ["hello", "tell me a joke", "why?", "what is rain?", "say hi", "explain cats", "go on"]


class ByteSum:
    def __init__(self, mod):
        self.mod = mod

    def score(self, prompts, responses):
        return np.array([sum(r.encode()) % self.mod / self.mod for r in responses])


def main(backbone: str, out: str) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    rank = distributed.state().process_index
    model = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(backbone)
    tok.padding_side = "left"
    cfg = SamplingConfig(k=2, max_new_tokens=6, batch_size=4, temperature=1.0)
    sample_responses(model, tok, [(f"p{i}", p) for i, p in enumerate(PROMPTS)], cfg, out_dir / "samples")

    experts = random_experts(model, np.eye(2), rank=4, seed=1)
    router = random_router(model, "center", np.array([0.5, 0.5]), experts, k=2, seed=2, std=0.0)
    hoe = HoEModel(model, ["a", "b"], experts, [router])
    rewards = {"a": ByteSum(97), "b": ByteSum(89)}
    norms = {o: (lambda x: (x - 0.5) / 0.3) for o in "ab"}
    train_cfg = RouterTrainingConfig(steps=3, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6)
    train_router(hoe, tok, 0, PROMPTS, rewards, norms, train_cfg, out_dir, ideal=[0.5, 0.5])
    gates = {
        f"{k}.{j}": t.contiguous() for k, v in hoe.export_router(0).gates.items() for j, t in enumerate(v)
    }
    save_file(gates, str(out_dir / f"router_rank{rank}.safetensors"))
    distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
