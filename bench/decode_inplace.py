"""Where HoE's decode time goes, timed in place: each layer call's parts, during real decoding.

Warm loops over one group say little about decoding, where the backbone's weights stream
through the caches between two visits of a group. This wraps, for one ``generate`` at a
time, ``HoELinear.forward``, ``Kernel.__call__``, ``FusedGroup.accepts``,
``FusedGroup.step``, ``HoELinear._base_call`` and the compiled ``group_step`` with
nanosecond counters, and takes a 34-token generation minus a 2-token one (the prompt's
prefill cancels) as 32 decode steps. Each wrapper adds about 0.4 µs per call (about
0.4 ms per token in all), so the Python figures are upper bounds.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/decode_inplace.py [--precision nf4] \
        [--repeats 5] [--out bench/decode_inplace-nf4.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

BUNDLE = "assets/smollm2-hhh"
PREFERENCE = (0.4, 0.3, 0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="nf4", choices=["fp32", "bf16", "int8", "nf4"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="also write the report here (markdown)")
    args = ap.parse_args()

    from hoe_core.bench import BENCH_PROMPTS, _generate_timed, invocation, routed_at, write_report
    from hoe_core.bundle import load_bundle
    from hoe_core.generation import encode_chat
    from hoe_core.routing import fused_cpu, kernel, layer

    loaded = load_bundle(BUNDLE, precision=args.precision)
    hoe = loaded.hoe
    enc = encode_chat(loaded.backbone.tokenizer, [BENCH_PROMPTS[0]], "cpu")
    routed = routed_at(hoe, PREFERENCE)
    targets = {  # name -> (owner, attribute)
        "HoELinear.forward": (layer.HoELinear, "forward"),
        "Kernel.__call__": (kernel.Kernel, "__call__"),
        "FusedGroup.accepts": (fused_cpu.FusedGroup, "accepts"),
        "FusedGroup.step": (fused_cpu.FusedGroup, "step"),
        "base calls": (layer.HoELinear, "_base_call"),
        "compiled group_step": (fused_cpu, "group_step"),
    }
    real = {name: getattr(owner, attr) for name, (owner, attr) in targets.items()}
    ns = dict.fromkeys(targets, 0)
    calls = dict.fromkeys(targets, 0)
    clock = time.perf_counter_ns

    def timed(name, fn):
        def call(*a):
            t = clock()
            out = fn(*a)
            ns[name] += clock() - t
            calls[name] += 1
            return out

        return call

    def run(n: int) -> tuple[dict, dict]:
        for name in ns:
            ns[name] = calls[name] = 0
        for name, (owner, attr) in targets.items():
            setattr(owner, attr, timed(name, real[name]))
        try:
            _generate_timed(hoe.model, enc, n, routed)
        finally:
            for name, (owner, attr) in targets.items():
                setattr(owner, attr, real[name])
        return dict(ns), dict(calls)

    _generate_timed(hoe.model, enc, 4, routed)  # warm-up: kernels built and compiled
    per_token, n_calls, totals = [], {}, []
    for _ in range(args.repeats):
        (a, _), (b, cb) = run(2), run(34)
        per_token.append({k: (b[k] - a[k]) / 32 / 1e6 for k in ns})  # ms per decode step
        n_calls = {k: cb[k] for k in cb}
        totals.append(_generate_timed(hoe.model, enc, 32, routed).decode_s / 31 * 1e3)
    med = {k: statistics.median(r[k] for r in per_token) for k in ns}
    step_python = med["FusedGroup.step"] - med["compiled group_step"]
    call_python = (
        med["Kernel.__call__"] - med["base calls"] - med["FusedGroup.step"] - med["FusedGroup.accepts"]
    )
    forward_python = med["HoELinear.forward"] - med["Kernel.__call__"]
    lines = [
        f"# HoE's decode step timed in place ({args.precision})",
        "",
        f"{invocation()}. Preference {PREFERENCE}; "
        f"medians of {args.repeats} repeats of (34 tokens - 2 tokens) / 32; HoE unwrapped: "
        f"{statistics.median(totals):.2f} ms per token.",
        "",
        "| part | ms per decode token (wrapped, inclusive) | calls per generation of 34 |",
        "|---|---|---|",
        *(f"| {k} | {v:.2f} | {n_calls[k]} |" for k, v in med.items()),
        "",
        "| Python of | ms per decode token (exclusive, upper bound) |",
        "|---|---|",
        f"| HoELinear.forward, before the kernel | {forward_python:.2f} |",
        f"| Kernel.__call__, outside base calls, accepts and step | {call_python:.2f} |",
        f"| FusedGroup.accepts | {med['FusedGroup.accepts']:.2f} |",
        f"| FusedGroup.step, outside the compiled call | {step_python:.2f} |",
    ]
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
