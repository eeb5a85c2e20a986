"""Preference routing (SPEC section 4): lambda -> convex weights over anchors. No parameters.

Anchors are the preferences at which LoRA experts and router experts sit. For a user's
lambda we take the N nearest anchors (N = number of objectives) and the convex weights
w (on the simplex) that minimise ||lambda - sum_k w_k anchor_k||. Inside their hull
this is the exact barycentric combination; outside it, the simplex-constrained least
squares solution. The solver enumerates supports (N is small), so it is exact.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

_TOL = 1e-9


ALLOWED = "finite numbers >= 0, at least one > 0"


def normalize_preference(values: Sequence[float], n_objectives: int | None = None) -> np.ndarray:
    """Validate raw slider/CLI values and scale them onto the simplex.

    Raises ValueError naming the field and the allowed range: wrong length, non-numeric,
    NaN/inf, negative, or all zeros. Any finite values work, however large: they are
    divided by their maximum before summing, so nothing overflows.
    """
    try:
        raw = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(
            f"preference must be numbers, one per objective ({ALLOWED}), got {values!r}"
        ) from None
    if n_objectives is not None and len(raw) != n_objectives:
        raise ValueError(f"preference needs {n_objectives} values (one per objective), got {len(raw)}")
    if not raw:
        raise ValueError(f"preference is empty; it needs one value per objective ({ALLOWED})")
    if not all(math.isfinite(v) for v in raw):
        raise ValueError(f"preference values must be finite ({ALLOWED}), got {raw}")
    if any(v < 0 for v in raw):
        raise ValueError(f"preference values must be >= 0 ({ALLOWED}), got {raw}")
    lam = np.asarray(raw, dtype=np.float64)
    peak = lam.max()
    if not peak > 0:
        raise ValueError(f"preference values must not all be zero ({ALLOWED})")
    lam = lam / peak  # in [0, 1]: the sum below cannot overflow
    return lam / lam.sum()


def _simplex_lsq(points: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """min_w ||points^T w - target|| s.t. w >= 0, sum w = 1, exactly, for few points.

    points (k, N), target (N,) -> (w (k,), residual). Every support is tried, smallest
    first; the best residual wins and, among equal residuals, the smallest support.
    """
    k = points.shape[0]
    best_w, best_res = None, math.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            sub = points[list(support)]  # (s, N)
            if size == 1:
                w_sub = np.ones(1)
            else:
                # Affine parametrisation w = e_0 + sum_j c_j (e_j - e_0) keeps sum w = 1.
                basis = (sub[1:] - sub[0]).T  # (N, s-1)
                c, *_ = np.linalg.lstsq(basis, target - sub[0], rcond=None)
                w_sub = np.concatenate([[1.0 - c.sum()], c])
            if w_sub.min() < -_TOL:
                continue
            w_sub = np.clip(w_sub, 0.0, None)
            w_sub /= w_sub.sum()
            res = float(np.linalg.norm(sub.T @ w_sub - target))
            if res < best_res - _TOL:
                best_res, best_w = res, np.zeros(k)
                best_w[list(support)] = w_sub
        if best_res <= _TOL:
            break  # exact fit on this support size; larger supports cannot do better
    assert best_w is not None
    return best_w, best_res


def route(preference: Sequence[float], anchors: np.ndarray, n_nearest: int | None = None) -> np.ndarray:
    """Convex weights over all anchors for one preference.

    Args:
        preference: (N,) on the simplex (normalise first).
        anchors: (K, N) anchor preferences of experts and routers.
        n_nearest: how many nearest anchors may be used (default N).
    Returns:
        (K,) weights >= 0 summing to 1, nonzero only on the chosen nearest anchors.
        A preference equal to an anchor returns that anchor alone.
    """
    lam = np.asarray(preference, dtype=np.float64)
    anchors = np.asarray(anchors, dtype=np.float64)
    if anchors.ndim != 2 or anchors.shape[1] != lam.shape[0]:
        raise ValueError(f"anchors must be (K, {lam.shape[0]}), got {anchors.shape}")
    n = n_nearest or lam.shape[0]
    dist = np.linalg.norm(anchors - lam, axis=1)
    nearest = np.argsort(dist, kind="stable")[: min(n, len(anchors))]
    weights = np.zeros(len(anchors))
    if dist[nearest[0]] <= _TOL:
        weights[nearest[0]] = 1.0
        return weights
    w, _ = _simplex_lsq(anchors[nearest], lam)
    weights[nearest] = w
    return weights
