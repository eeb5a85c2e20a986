"""Front metrics (SPEC section 7): mean with a 95% CI, Pareto filtering, hypervolume
(moocore, exact) against a fixed reference point, and steerability (Spearman rho between
lambda_i and mean reward_i over the preference grid). All objectives are maximised."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import moocore
import numpy as np
from scipy import stats


@dataclass(frozen=True)
class MeanCI:
    mean: float
    low: float
    high: float


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> MeanCI:
    """Mean and t-interval of a 1-D sample; a single value gets a zero-width interval."""
    x = np.asarray(values, float)
    if x.size == 0:
        raise ValueError("mean_ci of an empty sample")
    m = float(x.mean())
    if x.size < 2:
        return MeanCI(m, m, m)
    half = float(stats.sem(x) * stats.t.ppf((1 + confidence) / 2, x.size - 1))
    return MeanCI(m, m - half, m + half)


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """(P, N) points to maximise -> (P,) True where no other point dominates."""
    return moocore.is_nondominated(np.asarray(points, float), maximise=True)


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by ``points`` (P, N) and bounded below by ``reference`` (N,).

    Points not strictly better than the reference in every objective add nothing."""
    pts = np.asarray(points, float)
    ref = np.asarray(reference, float)
    pts = pts[(pts > ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(moocore.hypervolume(pts, ref=ref, maximise=True))


def steerability(preferences: np.ndarray, mean_rewards: np.ndarray) -> np.ndarray:
    """Spearman rho per objective between lambda_i (G, N) and mean reward_i (G, N) -> (N,)."""
    lam, r = np.asarray(preferences, float), np.asarray(mean_rewards, float)
    out = []
    for i in range(lam.shape[1]):
        rho = stats.spearmanr(lam[:, i], r[:, i]).statistic
        out.append(float(rho) if np.isfinite(rho) else 0.0)
    return np.array(out)


def simplex_grid(n_objectives: int, points_per_edge: int) -> np.ndarray:
    """All lambda on the simplex with coordinates in {0, 1/(G-1), ..., 1}. -> (M, N)

    G = 11 with two objectives gives 0, 0.1, ..., 1; with three, 66 points."""
    if n_objectives < 1 or points_per_edge < 2:
        raise ValueError("need >= 1 objective and >= 2 points per edge")
    steps = points_per_edge - 1
    rows = [c for c in itertools.product(range(steps + 1), repeat=n_objectives) if sum(c) == steps]
    return np.array(sorted(rows, reverse=True), float) / steps
