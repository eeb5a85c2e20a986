"""Forward-pass overhead of an HoE layer vs the bare linear, on SmolLM2-135M shapes.

    python bench/layer_overhead.py [--experts 6] [--rank 16] [--repeats 200] [--model]

Per module type of a SmolLM2 block it times the bare linear and the HoE layer wrapping it
(E experts of rank r, all active, plus one router over 3 of them) at decode (1 token) and
prefill (128 tokens) shapes, fp32 and nf4 bases, and prints medians and ratios measured in
the same run. ``--model`` also times greedy decoding of the whole backbone with and without
E random experts in every targeted linear.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hoe_core.routing.context import use_routing
from hoe_core.routing.layer import HoELinear

SHAPES = {  # SmolLM2-135M: hidden 576, intermediate 1536, 3 kv heads of 64
    "q_proj": (576, 576),
    "k_proj": (576, 192),
    "v_proj": (576, 192),
    "o_proj": (576, 576),
    "gate_proj": (576, 1536),
    "up_proj": (576, 1536),
    "down_proj": (1536, 576),
}


def median_seconds(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_base(d_in: int, d_out: int, precision: str) -> torch.nn.Module:
    lin = torch.nn.Linear(d_in, d_out, bias=False)
    if precision == "fp32":
        return lin
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    return q.to("cpu")


def layer_table(experts: int, rank: int, repeats: int) -> list[dict]:
    rows = []
    weights = torch.tensor([[0.6 / experts] * experts + [0.4]])  # all experts + router active
    for precision in ("fp32", "nf4"):
        for tokens in (1, 128):
            bare_total = hoe_total = 0.0
            for name, (d_in, d_out) in SHAPES.items():
                base = make_base(d_in, d_out, precision)
                factors = [
                    (torch.randn(d_out, rank) * 0.01, torch.randn(rank, d_in) * 0.01) for _ in range(experts)
                ]
                gate = ([0, 1, 2], torch.randn(3, d_in) * 0.01, torch.zeros(3))
                layer = HoELinear(base, name, factors, routers=[gate])
                x = torch.randn(1, tokens, d_in)
                with torch.no_grad():
                    bare = median_seconds(lambda b=base, x=x: b(x), repeats)
                    with use_routing(weights):
                        hoe = median_seconds(lambda m=layer, x=x: m(x), repeats)
                bare_total += bare
                hoe_total += hoe
                rows.append(
                    dict(
                        precision=precision,
                        tokens=tokens,
                        module=name,
                        bare_us=bare * 1e6,
                        hoe_us=hoe * 1e6,
                        ratio=hoe / bare,
                    )
                )
            rows.append(
                dict(
                    precision=precision,
                    tokens=tokens,
                    module="block (7 linears)",
                    bare_us=bare_total * 1e6,
                    hoe_us=hoe_total * 1e6,
                    ratio=hoe_total / bare_total,
                )
            )
    return rows


def model_decode(experts: int, rank: int, precision: str, new_tokens: int = 48) -> dict:
    import numpy as np

    from hoe_core.backbone import load_backbone
    from hoe_core.config import DecodingConfig
    from hoe_core.generation import encode_chat, generate_kwargs
    from hoe_core.pico import random_experts, random_router
    from hoe_core.routing.model import HoEModel

    bb = load_backbone(precision=precision, device="cpu")
    enc = encode_chat(bb.tokenizer, ["Tell me about the history of the bicycle."], "cpu")
    kw = generate_kwargs(DecodingConfig(max_new_tokens=new_tokens, repetition_penalty=1.0), bb.tokenizer)
    kw["min_new_tokens"] = new_tokens

    def run():
        with torch.no_grad():
            bb.model.generate(**enc, **kw)

    bare = median_seconds(run, 3)
    anchors = np.vstack([np.eye(3), [[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]])[:experts]
    exp = random_experts(bb.model, anchors, rank=rank, std=0.02)
    hoe = HoEModel(
        bb.model, ["a", "b", "c"], exp, [random_router(bb.model, "c", [1 / 3] * 3, exp, k=3, std=0.02)]
    )
    weights = torch.tensor([[0.6 / experts] * experts + [0.4]])
    with hoe.routing(anchor_weights=weights):
        routed = median_seconds(run, 3)
    return dict(
        precision=precision, bare_tok_s=new_tokens / bare, hoe_tok_s=new_tokens / routed, ratio=routed / bare
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--model", action="store_true", help="also time whole-model decoding")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"HoE layer overhead, E={args.experts}, r={args.rank}, torch threads {torch.get_num_threads()}")
    print(f"{'precision':<9} {'tokens':>6} {'module':<18} {'bare us':>9} {'HoE us':>9} {'ratio':>6}")
    for r in layer_table(args.experts, args.rank, args.repeats):
        print(
            f"{r['precision']:<9} {r['tokens']:>6} {r['module']:<18} {r['bare_us']:>9.1f} {r['hoe_us']:>9.1f} {r['ratio']:>6.2f}"
        )
    if args.model:
        for precision in ("fp32", "nf4"):
            m = model_decode(args.experts, args.rank, precision)
            print(
                f"whole model {precision}: backbone {m['bare_tok_s']:.1f} tok/s, HoE {m['hoe_tok_s']:.1f} tok/s, latency ratio {m['ratio']:.2f}"
            )


if __name__ == "__main__":
    main()
