"""Token-interleaved decode A/B: the bare backbone and HoE, one decode step of each in turn.

The main bench (``python -m hoe_core bench``) interleaves whole ``generate`` runs of the
backbone and HoE. Here the models decode the same prompt step by step, alternating every
token (each with its own KV cache, refreshed every 32 tokens), so drift hits them alike and
the ratio of the medians is robust; only the model's forward is timed. A third arm runs
HoE with the fused CPU kernels (``hoe_core/routing/fused_cpu.py``) turned off, to measure
what they save.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/interleaved_decode.py \\
        --precisions fp32,bf16,int8,nf4 --preference 0.4,0.3,0.3 --steps 96
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from transformers import DynamicCache

from hoe_core.backbone import load_backbone
from hoe_core.bench import BENCH_PROMPTS
from hoe_core.bundle import load_bundle
from hoe_core.generation import encode_chat
from hoe_core.routing.context import Routing, activate


def stepper(model, enc: dict, ctx):
    """Prefill ``enc``, then return a function that decodes one greedy token and its seconds."""
    cache = DynamicCache()
    with ctx(), torch.no_grad():
        out = model(**enc, past_key_values=cache, use_cache=True)
    state = {"ids": out.logits[:, -1:].argmax(-1), "mask": enc["attention_mask"]}

    def step() -> float:
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(1, 1)], 1)
        with ctx(), torch.no_grad():
            start = time.perf_counter()
            out = model(
                input_ids=state["ids"], attention_mask=state["mask"], past_key_values=cache, use_cache=True
            )
            seconds = time.perf_counter() - start
        state["ids"] = out.logits[:, -1:].argmax(-1)
        return seconds

    return step


def ab(bundle: str, precision: str, preference: list[float], steps: int) -> dict:
    """Median ms per decoded token of the bare backbone, HoE, and HoE with the fused CPU
    kernels turned off (torch ops only), interleaved per token."""
    loaded = load_bundle(bundle, precision=precision, device="cpu")
    hoe, tok = loaded.hoe, loaded.backbone.tokenizer
    bare = load_backbone(loaded.manifest.backbone["spec"], precision, "cpu", base_dir=loaded.root).model
    enc = encode_chat(tok, [BENCH_PROMPTS[0]], "cpu")
    weights = hoe.anchor_weights([preference])
    routing = Routing(weights=weights)  # one per run: kernels built once
    unfused = Routing(weights=weights)  # the same mixture on torch ops only
    times: dict[str, list[float]] = {"backbone": [], "hoe": [], "hoe_torch": []}
    while len(times["hoe"]) < steps:
        steps_of = {
            "backbone": stepper(bare, enc, nullcontext),
            "hoe": stepper(hoe.model, enc, lambda: activate(routing)),
            "hoe_torch": stepper(hoe.model, enc, lambda: activate(unfused)),
        }
        for kernel in unfused.kernels.values():  # built by the prefill; this routing's copies only
            kernel.fused = None
        for _ in range(32):
            for name, step in steps_of.items():
                times[name].append(step())
    med = {name: statistics.median(t[8:]) * 1e3 for name, t in times.items()}  # after a warm-up
    return {
        "precision": precision,
        "backbone_ms": med["backbone"],
        "hoe_ms": med["hoe"],
        "hoe_torch_ms": med["hoe_torch"],
        "ratio": med["backbone"] / med["hoe"],
        "ratio_torch": med["backbone"] / med["hoe_torch"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="assets/smollm2-hhh")
    p.add_argument("--precisions", default="fp32,bf16,int8,nf4")
    p.add_argument("--preference", default="0.4,0.3,0.3")
    p.add_argument("--steps", type=int, default=96)
    args = p.parse_args()
    pref = [float(v) for v in args.preference.split(",")]
    print(f"preference {pref}, {args.steps} interleaved steps, torch threads {torch.get_num_threads()}")
    print(
        "| precision | backbone ms/token | HoE ms/token | HoE / backbone tok/s "
        "| HoE, torch ops only, ms/token | its ratio |\n|---|---|---|---|---|---|"
    )
    for precision in args.precisions.split(","):
        r = ab(args.bundle, precision, pref, args.steps)
        print(
            f"| {precision} | {r['backbone_ms']:.1f} | {r['hoe_ms']:.1f} | {r['ratio']:.2f} "
            f"| {r['hoe_torch_ms']:.1f} | {r['ratio_torch']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
