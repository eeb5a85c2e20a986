"""Does running the baselines slow HoE's decode down for models loaded after them?

In the full bench, precisions measured after fp32's Rewarded Soups and merge-at-lambda runs
read HoE's decode slower against the backbone (int8 0.82-0.88) than the same precision run
alone (0.93-0.94). This measures it in one process: the backbone and HoE are loaded at
``--precision`` (set 1), then the fp32 baselines run as the bench runs them (RS re-merges
into its own backbone copy, merge-at-lambda's dense TIES deltas, each generating), are
dropped, and the backbone and HoE are loaded again (set 2); with ``--trim``, glibc's
``malloc_trim(0)`` is called before set 2 loads. All four models then decode in shuffled
order, round after round, so set 1 against set 2 is the disturbance's effect, measured
alike.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/after_baselines.py [--precision int8] \
        [--rounds 10] [--trim] [--out bench/after_baselines.md]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
from contextlib import nullcontext
from functools import partial

import numpy as np

BUNDLE = "assets/smollm2-hhh"
PREFERENCE = (0.4, 0.3, 0.3)


def load_set(precision: str):
    """(backbone model, HoE model, HoE's routing context, the encoded bench prompt) at
    ``precision``."""
    from hoe_core.bench import load_models, routed_at

    loaded, bare, prompt = load_models(BUNDLE, precision)
    return bare, loaded.hoe.model, routed_at(loaded.hoe, PREFERENCE), prompt


def disturb(tokens: int) -> float:
    """fp32 Rewarded Soups and merge-at-lambda as ``hoe_core.bench`` runs them (a few
    preferences each, one short generation each), then dropped. Returns peak-ish RSS MiB."""
    from hoe_core.backbone import load_backbone
    from hoe_core.baselines import merge as merge_baseline
    from hoe_core.baselines.soups import MergedSoup
    from hoe_core.bench import BENCH_PROMPTS, RssPeak, _generate_timed
    from hoe_core.bundle import load_bundle
    from hoe_core.generation import encode_chat

    with RssPeak() as mem:
        loaded = load_bundle(BUNDLE, precision="fp32")
        hoe = loaded.hoe
        enc = encode_chat(loaded.backbone.tokenizer, [BENCH_PROMPTS[0]], "cpu")
        factors = merge_baseline.single_factors(hoe, loaded.experts)
        rs_model = load_backbone(loaded.manifest.backbone["spec"], "fp32", "cpu", base_dir=loaded.root).model
        soup = MergedSoup(rs_model, factors)
        for lam in ([0.2, 0.3, 0.5], list(PREFERENCE)) * 2:
            soup.set_preference(np.asarray(lam))
            _generate_timed(rs_model, enc, tokens)
        merger = merge_baseline.MergeAtPreference(factors, "ties", "cpu", density=0.5)
        for lam in ([0.2, 0.3, 0.5], list(PREFERENCE)):
            deltas = merger.deltas(np.asarray(lam))
            _generate_timed(hoe.model, enc, tokens, partial(merge_baseline.use_deltas, hoe, deltas))
        del soup, rs_model, merger, deltas, hoe, loaded, factors
        gc.collect()
    return mem.peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="int8", choices=["fp32", "bf16", "int8", "nf4"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after the baselines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the report here (markdown)")
    args = ap.parse_args()

    from hoe_core.bench import invocation, shuffled_rounds, write_report

    b1, h1, ctx1, enc = load_set(args.precision)
    peak = disturb(4)
    if args.trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    b2, h2, ctx2, _ = load_set(args.precision)
    arms = {
        "backbone 1": (b1, nullcontext),
        "hoe 1": (h1, ctx1),
        "backbone 2": (b2, nullcontext),
        "hoe 2": (h2, ctx2),
    }
    ms, _ = shuffled_rounds(arms, enc, args.rounds, args.tokens, args.seed)  # decode ms per token
    med = {k: statistics.median(v) for k, v in ms.items()}
    ratio = {
        s: statistics.median(b / h for b, h in zip(ms[f"backbone {s}"], ms[f"hoe {s}"])) for s in ("1", "2")
    }
    lines = [
        "# HoE decode for models loaded before and after the fp32 baselines, one process",
        "",
        f"{invocation()}. Precision {args.precision}, "
        f"preference {PREFERENCE}, {args.rounds} rounds x {args.tokens} tokens, arms shuffled per round. "
        f"Set 1 loaded first; then fp32 RS and merge-at-lambda ran (peak RSS {peak:.0f} MiB) and were "
        f"dropped{'; malloc_trim(0)' if args.trim else ''}; then set 2 loaded.",
        "",
        "| arm | decode ms per token (median) | tokens/s |",
        "|---|---|---|",
        *(f"| {k} | {v:.2f} | {1e3 / v:.1f} |" for k, v in med.items()),
        "",
        f"HoE / backbone tok/s, median of per-round ratios: set 1 **{ratio['1']:.3f}**, "
        f"set 2 **{ratio['2']:.3f}**.",
    ]
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
