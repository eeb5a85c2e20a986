"""The summary of an evaluation CSV (SPEC section 7): per method and preference the mean
reward per objective with a 95% CI; the method's Pareto points; hypervolume against a
fixed reference point; steerability (Spearman rho of lambda_i vs mean r_i over the grid);
HoE's win rate against each method at equal lambda; HoE's hypervolume minus each
method's, with a 95% interval from a paired bootstrap over prompts (the same resampled
prompts for both methods, so prompt difficulty cancels).

    win(hoe, b) = mean over (lambda, prompt) of  [s_hoe > s_b] + 0.5 [s_hoe == s_b],
                  s = sum_i lambda_i r_i  (the answer's reward scalarised at its own lambda)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hoe_core.evaluation.front import mean_front
from hoe_core.evaluation.metrics import hypervolume, mean_ci, pareto_mask, steerability

DEFAULT_REFERENCE = -1.0  # per objective, normalised units (the base model's samples: mean 0, std 1)


def _key(row: dict, objectives: Sequence[str]) -> tuple[float, ...]:
    return tuple(round(row[f"w_{o}"], 9) for o in objectives)


def summarize(
    rows: Sequence[dict],
    objectives: Sequence[str],
    reference: Sequence[float] | None = None,
    preference_free: Sequence[str] = (),
    reference_method: str = "hoe",
) -> dict:
    """Everything the fronts README, the app and the note report, as JSON-friendly data."""
    ref = np.full(len(objectives), DEFAULT_REFERENCE) if reference is None else np.asarray(reference, float)
    if ref.shape != (len(objectives),):
        raise ValueError(f"reference point needs {len(objectives)} values, got {ref.tolist()}")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out: dict = {"objectives": list(objectives), "reference_point": ref.tolist(), "methods": {}}
    for m in methods:
        mrows = [r for r in rows if r["method"] == m]
        prefs, means = mean_front(mrows, objectives)
        points = []
        for lam, mean in zip(prefs, means):
            at = [r for r in mrows if _key(r, objectives) == tuple(round(x, 9) for x in lam)]
            cis = [mean_ci(np.array([r[f"r_{o}"] for r in at])) for o in objectives]
            points.append(
                {
                    "preference": lam.tolist(),
                    "mean": mean.tolist(),
                    "ci_low": [c.low for c in cis],
                    "ci_high": [c.high for c in cis],
                    "n": len(at),
                }
            )
        free = m in preference_free
        unique = means[:1] if free else means
        mask = pareto_mask(unique)
        for p, keep in zip(points, np.resize(mask, len(points))):
            p["pareto"] = bool(keep)
        out["methods"][m] = {
            "points": points,
            "hypervolume": hypervolume(unique, ref),
            "steerability": None if free else dict(zip(objectives, steerability(prefs, means).tolist())),
            "preference_free": free,
        }
    if reference_method in out["methods"]:
        out["win_rate"] = {
            b: win_rate(rows, objectives, reference_method, b) for b in methods if b != reference_method
        }
        others = [b for b in methods if b != reference_method]
        out["hv_gap"] = hv_gaps(rows, objectives, ref, reference_method, others, preference_free)
    return out


def _reward_cube(rows: Sequence[dict], objectives: Sequence[str], method: str) -> tuple[list, np.ndarray]:
    """A method's rewards as (prompt ids, (P prompts, G preferences, N)); preferences sorted."""
    mrows = [r for r in rows if r["method"] == method]
    prompts = sorted({r["prompt_id"] for r in mrows})
    prefs = sorted({_key(r, objectives) for r in mrows})
    cube = np.full((len(prompts), len(prefs), len(objectives)), np.nan)
    pi, gi = {p: i for i, p in enumerate(prompts)}, {g: i for i, g in enumerate(prefs)}
    for r in mrows:
        cube[pi[r["prompt_id"]], gi[_key(r, objectives)]] = [r[f"r_{o}"] for o in objectives]
    if np.isnan(cube).any():
        raise ValueError(f"method {method!r} lacks some (preference, prompt) rows")
    return prompts, cube


def hv_gaps(
    rows: Sequence[dict],
    objectives: Sequence[str],
    reference: np.ndarray,
    a: str,
    others: Sequence[str],
    preference_free: Sequence[str] = (),
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """HV(a) - HV(b) of the mean fronts for each b in ``others``, with a 95% paired-bootstrap
    interval over prompts (the same resampled prompts for a and every b; a's HVs once).

    Returns per b {"gap", "low", "high", "p_a_below"}: the gap on all prompts, the 2.5% and
    97.5% quantiles of the resampled gaps, and the share of resamples where a's HV < b's.
    """
    prompts, cube_a = _reward_cube(rows, objectives, a)
    n = len(prompts)
    rng = np.random.default_rng(seed)
    draws = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(n_boot)]  # all prompts, then resamples

    def hvs(cube: np.ndarray) -> np.ndarray:
        return np.array([hypervolume(cube[idx].mean(0), reference) for idx in draws])

    hv_a = hvs(cube_a)
    out = {}
    for b in others:
        prompts_b, cube_b = _reward_cube(rows, objectives, b)
        if prompts_b != prompts:
            raise ValueError(f"methods {a!r} and {b!r} were evaluated on different prompts")
        gaps = hv_a - hvs(cube_b[:, :1] if b in preference_free else cube_b)
        out[b] = {
            "gap": float(gaps[0]),
            "low": float(np.quantile(gaps[1:], 0.025)),
            "high": float(np.quantile(gaps[1:], 0.975)),
            "p_a_below": float((gaps[1:] < 0).mean()),
        }
    return out


def win_rate(rows: Sequence[dict], objectives: Sequence[str], a: str, b: str) -> float:
    """How often method ``a``'s answer beats ``b``'s at the same (lambda, prompt)."""

    def scalar(row):
        return sum(row[f"w_{o}"] * row[f"r_{o}"] for o in objectives)

    theirs = {(_key(r, objectives), r["prompt_id"]): scalar(r) for r in rows if r["method"] == b}
    scores = []
    for r in rows:
        k = (_key(r, objectives), r["prompt_id"])
        if r["method"] == a and k in theirs:
            s_a, s_b = scalar(r), theirs[k]
            scores.append(1.0 if s_a > s_b else 0.5 if s_a == s_b else 0.0)
    if not scores:
        raise ValueError(f"methods {a!r} and {b!r} share no (preference, prompt) pair")
    return float(np.mean(scores))


def markdown_table(summary: dict, timing: dict | None = None) -> str:
    """Hypervolume, steerability, HoE's win rate and cost per method, as a Markdown table."""
    objectives = summary["objectives"]
    head = ["method", "hypervolume", "HoE HV minus this [95% CI]", *(f"rho {o}" for o in objectives)]
    head += ["HoE win rate"]
    if timing:
        head += ["answers / min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, s in summary["methods"].items():
        steer = s["steerability"] or {}
        cells = [f"`{m}`", f"{s['hypervolume']:.3f}"]
        g = summary.get("hv_gap", {}).get(m)
        cells.append(f"{g['gap']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]" if g else "–")
        cells += [f"{steer[o]:.2f}" if o in steer else "–" for o in objectives]
        win = summary.get("win_rate", {}).get(m)
        cells.append(f"{win:.2f}" if win is not None else "–")
        if timing:
            rate = (timing.get(m) or {}).get("per_minute")
            cells.append(f"{rate:.0f}" if rate else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
