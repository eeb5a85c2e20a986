"""Reward fidelity of a method across backbone precisions: the same prompts and preference
grid at each precision, compared answer by answer against a reference precision (fp32).

For one method (default HoE), each precision p and the reference q, over the
(preference, prompt) cells both evaluated::

    shift_i   = mean over cells of r_i(p) - r_i(q)     (paired; 95% t-interval)
    moved_i   = mean over cells of |r_i(p) - r_i(q)|   (how far single answers move)
    identical = share of cells whose answer text is the same at p as at q
    HV(p)     = hypervolume of the method's mean-reward front at p (SPEC section 7)

``python -m hoe_core.evaluation.fidelity --front fp32=precomputed_fronts/smollm2-hhh/front-fp32.csv
--front nf4=... [--md OUT]`` prints (and writes) the table the README quotes. The CSVs are
the evaluation's own (``python -m hoe_core.evaluation.fronts``), so the numbers come from
the real reward models on real generations.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hoe_core.evaluation.front import front_hypervolume
from hoe_core.evaluation.metrics import mean_ci
from hoe_core.evaluation.run import read_csv
from hoe_core.evaluation.summary import DEFAULT_REFERENCE, _key


def _cells(rows: Sequence[dict], objectives: Sequence[str], method: str) -> dict[tuple, dict]:
    """(preference, prompt id) -> row, for one method."""
    cells = {}
    for r in rows:
        if r["method"] == method:
            cells[(*_key(r, objectives), r["prompt_id"])] = r
    return cells


def fidelity(
    fronts: dict[str, Sequence[dict]],
    objectives: Sequence[str],
    reference: str = "fp32",
    method: str = "hoe",
) -> dict:
    """Per precision: cells compared, HV, per-objective shift (mean, CI) and mean |change|,
    and the share of identical answers, all against ``reference``.

    Args:
        fronts: precision -> evaluation rows (``read_csv``), each with ``method`` rows.
        objectives: the objective names (CSV columns ``w_<o>``, ``r_<o>``).
    Raises:
        ValueError: no reference front, the method missing from a front, or no cell shared
            with the reference (different prompts or grids cannot be compared).
    """
    if reference not in fronts:
        raise ValueError(f"no front for the reference precision {reference!r}; got {sorted(fronts)}")
    ref_point = np.full(len(objectives), DEFAULT_REFERENCE)
    ref_cells = _cells(fronts[reference], objectives, method)
    if not ref_cells:
        raise ValueError(f"the {reference} front has no rows of method {method!r}")
    out: dict = {"method": method, "reference": reference, "objectives": list(objectives), "precisions": {}}
    for precision, rows in fronts.items():
        cells = _cells(rows, objectives, method)
        if not cells:
            raise ValueError(f"the {precision} front has no rows of method {method!r}")
        shared = sorted(set(cells) & set(ref_cells))
        if not shared:
            raise ValueError(
                f"the {precision} and {reference} fronts share no (preference, prompt) cell: "
                "evaluate them on the same prompts and grid"
            )
        diff = np.array(
            [[cells[c][f"r_{o}"] - ref_cells[c][f"r_{o}"] for o in objectives] for c in shared]
        )  # (cells, N)
        shift = {o: mean_ci(diff[:, i]) for i, o in enumerate(objectives)}
        out["precisions"][precision] = {
            "cells": len(shared),
            "hypervolume": front_hypervolume([cells[c] for c in shared], objectives, ref_point),
            "shift": {o: [ci.mean, ci.low, ci.high] for o, ci in shift.items()},
            "moved": {o: float(np.abs(diff[:, i]).mean()) for i, o in enumerate(objectives)},
            "identical": float(np.mean([cells[c]["text"] == ref_cells[c]["text"] for c in shared])),
        }
    return out


def markdown(result: dict) -> str:
    """The fidelity table: one row per precision, the reference first."""
    objs, ref = result["objectives"], result["reference"]
    head = (
        f"| precision | cells | {result['method']} HV | "
        + " | ".join(f"{o}: mean shift [95% CI] / mean abs change" for o in objs)
        + f" | answers identical to {ref} |"
    )
    lines = [head, "|" + "---|" * (4 + len(objs))]
    order = [ref, *(p for p in result["precisions"] if p != ref)]
    for p in order:
        r = result["precisions"][p]
        cols = [
            f"{r['shift'][o][0]:+.3f} [{r['shift'][o][1]:+.3f}, {r['shift'][o][2]:+.3f}] / {r['moved'][o]:.3f}"
            for o in objs
        ]
        lines.append(
            f"| {p} | {r['cells']} | {r['hypervolume']:.3f} | "
            + " | ".join(cols)
            + f" | {r['identical']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def _front_arg(text: str) -> tuple[str, Path]:
    precision, sep, path = text.partition("=")
    if not sep or not precision or not path:
        raise argparse.ArgumentTypeError(f"--front takes PRECISION=CSV, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--front {precision}: no such file {path}")
    return precision, Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hoe_core.evaluation.fidelity",
        description="Reward fidelity of a method at each backbone precision against a reference (fp32).",
    )
    p.add_argument("--front", type=_front_arg, action="append", required=True, help="PRECISION=front CSV")
    p.add_argument("--reference", default="fp32")
    p.add_argument("--method", default="hoe")
    p.add_argument("--md", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    fronts, objectives = {}, None
    for precision, path in args.front:
        rows, names = read_csv(path)
        if objectives is not None and names != objectives:
            p.error(f"{path} has objectives {names}, the others {objectives}")
        fronts[precision], objectives = rows, names
    try:
        table = markdown(fidelity(fronts, objectives, args.reference, args.method))
    except ValueError as err:
        p.error(str(err))
    print(table, end="")
    if args.md:
        command = " ".join(
            ["python -m hoe_core.evaluation.fidelity", *(sys.argv[1:] if argv is None else argv)]
        )
        args.md.write_text(
            f"# Reward fidelity of `{args.method}` against {args.reference}\n\n"
            f"Command: `{command}`\n\n"
            "Per precision, over the (preference, prompt) cells shared with the reference: the "
            "front's hypervolume; per objective the mean reward shift with a 95% t-interval and "
            "the mean absolute change of single answers (normalised units); the share of "
            "identical answer texts. Greedy decoding diverges at the first differing token, so "
            "few texts stay identical even when the reward distribution does not move.\n\n" + table,
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
