"""Where HoE's extra decode time per token goes, by ablation, in one process.

Arms, decoded in shuffled order round after round (greedy, a fixed number of tokens):

- ``backbone``: the bare backbone;
- ``wrappers``: HoE's model outside a routing block (every HoE layer passes straight to its
  base: the wrapper modules' calls alone);
- ``no kernel``: HoE routed as served, but the compiled decode step returns at once (every
  Python step, lookup and dispatch kept; no delta added, so its tokens differ);
- ``hoe``: HoE as served.

The per-round differences between neighbouring arms split HoE's extra time into the
wrappers, the Python path and the compiled kernel.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/decode_ablation.py [--precision nf4] \
        [--rounds 12] [--out bench/decode_ablation.md]
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager, nullcontext

BUNDLE = "assets/smollm2-hhh"
PREFERENCE = (0.4, 0.3, 0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="nf4", choices=["fp32", "bf16", "int8", "nf4"])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the report here (markdown)")
    args = ap.parse_args()

    from hoe_core.bench import invocation, load_models, routed_at, shuffled_rounds, write_report
    from hoe_core.routing import fused_cpu

    loaded, bare, enc = load_models(BUNDLE, args.precision)
    hoe = loaded.hoe
    routed = routed_at(hoe, PREFERENCE)
    real_step = fused_cpu.group_step

    @contextmanager
    def no_kernel():
        fused_cpu.group_step = lambda *a: None
        try:
            with routed():
                yield
        finally:
            fused_cpu.group_step = real_step

    arms = {
        "backbone": (bare, nullcontext),
        "wrappers": (hoe.model, nullcontext),
        "no kernel": (hoe.model, no_kernel),
        "hoe": (hoe.model, routed),
    }
    ms, _ = shuffled_rounds(arms, enc, args.rounds, args.tokens, args.seed)  # decode ms per token
    med = {k: statistics.median(v) for k, v in ms.items()}
    names = list(arms)
    steps = [(b, a, statistics.median(x - y for x, y in zip(ms[b], ms[a]))) for a, b in zip(names, names[1:])]
    total = statistics.median(x - y for x, y in zip(ms["hoe"], ms["backbone"]))
    lines = [
        f"# HoE's decode time per token by ablation ({args.precision}), one process",
        "",
        f"{invocation()}. Preference {PREFERENCE}, "
        f"{args.rounds} rounds x {args.tokens} tokens, arms shuffled per round.",
        "",
        "| arm | decode ms per token (median) | tokens/s | backbone / arm |",
        "|---|---|---|---|",
        *(f"| {k} | {v:.2f} | {1e3 / v:.1f} | {med['backbone'] / v:.3f} |" for k, v in med.items()),
        "",
        "| step | ms per token (median of per-round differences) |",
        "|---|---|",
        *(f"| {b} - {a} | {d:+.2f} |" for b, a, d in steps),
        f"| hoe - backbone | {total:+.2f} |",
    ]
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
