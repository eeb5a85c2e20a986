"""precomputed_fronts/<bundle>/: every method's front on the eval prompts, at the app's
precision and at fp32, with a README table; the app plots these files.

    python -m hoe_core.evaluation.fronts --bundle assets/smollm2-hhh \\
        --out precomputed_fronts/smollm2-hhh [--grid 5] [--max-prompts 48] [--precisions nf4,fp32]

writes prompts.txt (the eval prompts used), front-<precision>.csv (the evaluate contract),
front-<precision>.summary.json / .md, and README.md. Each evaluation resumes from its
``.parts`` folder, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from hoe_core.config import APP_PRECISION

DEFAULT_METHODS = "hoe,rs,mod,merge-ties,base,experts"

#: per-token cost of each method in forwards of the backbone, and what it stores
COST_NOTES = {
    "hoe": ("1", "E LoRA experts + P routers, all loaded once"),
    "rs": ("1", "the N single experts (interpolated unmerged: exact)"),
    "mod": ("#{lambda_i > 0} (1-3)", "the N single experts; one KV cache per model"),
    "merge-ta": ("1 + dense delta", "a dense tau_lambda per module, re-merged per lambda"),
    "merge-ties": ("1 + dense delta", "a dense tau_lambda per module, re-merged per lambda"),
    "base": ("1", "nothing"),
}


def eval_prompts(source: Path, max_prompts: int | None) -> list[str]:
    """The eval split, evenly thinned to ``max_prompts`` (the file is grouped by source)."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if max_prompts and max_prompts < len(lines):
        keep = np.linspace(0, len(lines) - 1, max_prompts).round().astype(int)
        lines = [lines[i] for i in keep]
    return lines


def readme(bundle: str, summaries: dict[str, dict], command: str, n_prompts: int, grid: int) -> str:
    from hoe_core.evaluation.summary import markdown_table

    first = next(iter(summaries.values()))
    objectives = first["objectives"]
    parts = [
        f"# Precomputed fronts: `{bundle}`\n",
        f"Every method over a simplex lattice of {max(len(m['points']) for m in first['methods'].values())} preferences "
        f"(G = {grid} per edge) on {n_prompts} eval prompts (`prompts.txt`, evenly spaced over "
        "assets/prompts/eval.txt), greedy decoding. Rewards are "
        + ("normalised with the base model's sample statistics" if first["normalised"] else "raw")
        + f"; hypervolume against the fixed reference point {first['reference_point']} "
        f"({', '.join(objectives)}). HoE win rate: how often HoE's answer has the higher "
        "lambda-weighted reward at the same preference and prompt (0.5 = tie).\n",
        f"Made by:\n\n```\n{command}\n```\n",
    ]
    for precision, summary in summaries.items():
        parts.append(f"## {precision}{' (the app default)' if precision == APP_PRECISION else ''}\n")
        parts.append(markdown_table(summary, summary["timing"]))
        methods = summary["methods"]
        if "hoe" in methods:
            above = [
                m
                for m, v in methods.items()
                if m != "hoe" and v["hypervolume"] > methods["hoe"]["hypervolume"]
            ]
            low = [o for o, rho in (methods["hoe"]["steerability"] or {}).items() if rho < 0.8]
            if above:
                ranking = "HoE's hypervolume is below " + ", ".join(f"`{m}`" for m in above)
            elif len(methods) > 1:
                ranking = "HoE's hypervolume is the highest"
            else:  # nothing to rank against (a HoE-only run, e.g. the precision fidelity fronts)
                ranking = (
                    f"HoE's hypervolume is {methods['hoe']['hypervolume']:.3f} (no other method in this run)"
                )
            parts.append(
                ranking
                + (
                    f"; its steerability is under 0.8 for {', '.join(low)}."
                    if low
                    else "; steerability >= 0.8 everywhere."
                )
            )
            gaps = summary.get("hv_gap", {})
            unresolved = [m for m, g in gaps.items() if not methods[m]["preference_free"] and g["low"] <= 0]
            if unresolved:
                parts.append(
                    "On these prompts the 95% interval of HoE's hypervolume gap includes 0 against "
                    + ", ".join(f"`{m}`" for m in unresolved)
                    + ": more prompts are needed to separate them."
                )
        parts.append("")
    parts.append(
        "Answers per minute are timed by the run that computed each cached part (a method whose "
        "inputs did not change keeps its answers and timing from an earlier run).\n"
    )
    parts.append("## Cost per method\n")
    parts.append("| method | backbone forwards / token | what it keeps in memory |\n|---|---|---|")
    for m, (fwd, mem) in COST_NOTES.items():
        if m in first["methods"]:
            parts.append(f"| `{m}` | {fwd} | {mem} |")
    parts.append("| `expert-<o>` | 1 | one single expert |\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from hoe_core.evaluation.run import evaluate_bundle

    p = argparse.ArgumentParser(
        prog="python -m hoe_core.evaluation.fronts", description=__doc__.split("\n")[0]
    )
    p.add_argument("--bundle", type=Path, default=Path("assets/smollm2-hhh"))
    p.add_argument("--out", type=Path, default=None, help="default: precomputed_fronts/<bundle name>")
    p.add_argument("--prompts", type=Path, default=Path("assets/prompts/eval.txt"))
    p.add_argument("--max-prompts", type=int, default=48)
    p.add_argument("--grid", type=int, default=5, help="5 -> 15 preferences for 3 objectives")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--precisions", default=f"{APP_PRECISION},fp32")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    out = args.out or Path("precomputed_fronts") / args.bundle.name
    out.mkdir(parents=True, exist_ok=True)
    prompts = eval_prompts(args.prompts, args.max_prompts)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    command = "python -m hoe_core.evaluation.fronts " + " ".join(argv if argv is not None else sys.argv[1:])
    summaries = {}
    for precision in [x.strip() for x in args.precisions.split(",") if x.strip()]:
        start = time.perf_counter()
        summaries[precision] = evaluate_bundle(
            args.bundle,
            args.methods.split(","),
            out / "prompts.txt",
            args.grid,
            out / f"front-{precision}.csv",
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            precision=precision,
        )
        print(f"{precision}: {time.perf_counter() - start:.0f} s", flush=True)
    (out / "README.md").write_text(
        readme(str(args.bundle), summaries, command.strip(), len(prompts), args.grid)
    )
    (out / "fronts.json").write_text(
        json.dumps({"bundle": str(args.bundle), "precisions": list(summaries), "command": command}, indent=2)
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
