"""HoE's decode with the compiled step's factors exact against int8, in one process.

Two HoE models on the same bundle and precision: one packs its kernels' factors with
``HOE_KERNEL_FACTORS=exact`` (float16 where exact, as the bundle stores them), the other
with ``int8`` (per-row scaled); both and the bare backbone decode in shuffled order, round
after round. Reported: median ms per token and the per-round difference int8 - exact.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/ab_kernel_factors.py [--precision nf4] \
        [--rounds 16] [--out bench/ab_kernel_factors-nf4.md]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

BUNDLE = "assets/smollm2-hhh"
PREFERENCE = (0.4, 0.3, 0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="nf4", choices=["fp32", "bf16", "int8", "nf4"])
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the report here (markdown)")
    args = ap.parse_args()

    import numpy as np

    from hoe_core.backbone import load_backbone
    from hoe_core.bench import BENCH_PROMPTS, _generate_timed
    from hoe_core.bundle import load_bundle
    from hoe_core.generation import encode_chat

    arms = {}
    for fmt in ("exact", "int8"):
        loaded = load_bundle(BUNDLE, precision=args.precision)
        hoe = loaded.hoe
        arms[fmt] = (hoe.model, partial(hoe.routing, anchor_weights=hoe.anchor_weights([PREFERENCE])))
        enc = encode_chat(loaded.backbone.tokenizer, [BENCH_PROMPTS[0]], "cpu")
        os.environ["HOE_KERNEL_FACTORS"] = fmt  # read when the kernels pack their factors: now
        _generate_timed(*arms[fmt][:1], enc, 2, arms[fmt][1])
        kernels = [g for m in hoe.layers.values() for g in [m.group.stacks] if g]
        packed = {
            s.factors.flat.dtype for stacks in kernels for s in stacks.values() if s.factors is not None
        }
        assert packed == ({np.dtype(np.int8)} if fmt == "int8" else {np.dtype(np.int16)}), (fmt, packed)
    del os.environ["HOE_KERNEL_FACTORS"]
    bare = load_backbone(loaded.manifest.backbone["spec"], args.precision, "cpu", base_dir=loaded.root).model
    arms = {"backbone": (bare, nullcontext), **arms}
    ms: dict[str, list[float]] = {k: [] for k in arms}
    rng = random.Random(args.seed)
    for r in range(args.rounds + 1):  # round 0 warms up
        order = list(arms)
        rng.shuffle(order)
        for label in order:
            model, ctx = arms[label]
            t = _generate_timed(model, enc, args.tokens, ctx)
            if r:
                ms[label].append(t.decode_s / (args.tokens - 1) * 1e3)
    med = {k: statistics.median(v) for k, v in ms.items()}
    diff = statistics.median(a - b for a, b in zip(ms["int8"], ms["exact"]))
    lines = [
        f"# Decode with the compiled step's factors exact or int8 ({args.precision}), one process",
        "",
        f"`{' '.join(['python', *sys.argv])}`, {time.strftime('%Y-%m-%d %H:%M')}. Preference {PREFERENCE}, "
        f"{args.rounds} rounds x {args.tokens} tokens, arms shuffled per round.",
        "",
        "| arm | decode ms per token (median) | tokens/s | arm / backbone tok/s |",
        "|---|---|---|---|",
        *(f"| {k} | {v:.2f} | {1e3 / v:.1f} | {med['backbone'] / v:.3f} |" for k, v in med.items()),
        "",
        f"Per-round difference int8 - exact, median: **{diff:+.2f} ms per token**.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
