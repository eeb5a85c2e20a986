"""Merging objective vectors at a preference (SPEC section 2).

One contract for every method, kept in :data:`MERGE_METHODS` by name::

    fn(task_vectors: Tensor[n, d], weights: Tensor[n], **params) -> Tensor[d]

on flattened per-module vectors. TA / TIES / DARE delegate to ``peft.utils.merge_utils``;
PCB-merging (Du et al., NeurIPS 2024) is ours, transcribed from the authors' ``PCB_merge``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Protocol

import torch
from peft.utils import merge_utils

from hoe_core.experts.task_svd import LowRankDelta, TaskVector, as_dense


class MergeFn(Protocol):
    def __call__(self, task_vectors: torch.Tensor, weights: torch.Tensor, **params) -> torch.Tensor: ...


def _rows(task_vectors: torch.Tensor) -> list[torch.Tensor]:
    return list(task_vectors.float().unbind(0))


def task_arithmetic(task_vectors: torch.Tensor, weights: torch.Tensor, scale: float = 1.0):
    """c * sum_i w_i tau_i.  task_vectors (n, d), weights (n,) -> (d,)."""
    return scale * merge_utils.task_arithmetic(_rows(task_vectors), weights.float())


def ties(
    task_vectors: torch.Tensor,
    weights: torch.Tensor,
    density: float = 0.2,
    majority_sign_method: str = "total",
):
    """TIES at a preference: trim each row to ``density`` (peft's magnitude prune), elect
    the sign from the *weighted* rows, then the weighted mean over agreeing rows,
    sum_i w_i m_i tau_i / sum_i w_i m_i.  (n, d) -> (d,).

    peft's ``merge_utils.ties`` elects signs from unweighted rows and averages by count,
    so a zero-weight task still votes and dilutes the result; at a preference vertex ours
    returns that task's trimmed vector, which is what an anchor at a vertex must give.
    """
    trimmed = torch.stack([merge_utils.prune(t, density, method="magnitude") for t in _rows(task_vectors)])
    w = weights.float()[:, None]  # (n, 1)
    mask = merge_utils.calculate_majority_sign_mask(trimmed * w, method=majority_sign_method)
    mask = mask & (trimmed != 0) & (w > 0)  # (n, d): rows that contribute to each entry
    return (w * trimmed * mask).sum(0) / (w * mask).sum(0).clamp_min(1e-12)


def dare(task_vectors: torch.Tensor, weights: torch.Tensor, density: float = 0.5, seed: int = 0):
    """DARE: random drop to ``density`` and rescale, then weighted sum (peft).

    Seeded through a forked RNG so a merge is reproducible and leaves global state alone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return merge_utils.dare_linear(_rows(task_vectors), weights.float(), density)


def _minmax_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max scaling without eps, as the authors do; rows with max == min are
    flagged (their scaled values are set to 0 instead of NaN)."""
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    flat = span == 0
    return torch.where(flat, torch.zeros_like(x), (x - lo) / torch.where(flat, 1, span)), flat


def pcb(
    task_vectors: torch.Tensor,
    weights: torch.Tensor,
    keep_ratio: float = 0.1,
    clamp_quantile: float = 1e-4,
) -> torch.Tensor:
    """PCB-merging (parameter competition balancing).  (n, d), (n,) -> (d,).

    Steps (all sorts and min-max per row, i.e. per task over its parameters):
      1. clamp |T| into its [q, 1-q] order statistics -> C = sign(T) |T|_clip
      2. intra = exp(n * minmax(|C|)^2)
      3. inter = tanh(T * sum_j T_j)
      4. beta = intra * inter
      5. t = sorted(beta)[floor(d (1 - ratio))]; s = (max(beta, t) - t) / (max beta - t)
      6. merged = sum_i w_i s_i C_i / max(sum_i s_i, 1e-12)
    Guards the authors' code lacks: a constant or all-zero row, or a row where nothing
    lies above the threshold, gets s = 0 (finite result).
    """
    t = task_vectors.float()
    n, d = t.shape
    q = clamp_quantile
    magnitude = t.abs()
    ordered = magnitude.sort(dim=1).values
    # Negative indices (only for d == 1) wrap around as in the authors' numpy code.
    lo = ordered[:, math.floor(d * q)].unsqueeze(1)
    hi = ordered[:, math.floor(d * (1 - q) - 1)].unsqueeze(1)
    clipped = torch.minimum(torch.maximum(magnitude, lo), hi)
    c = torch.sign(t) * clipped  # (n, d)

    scaled, flat = _minmax_rows(c.abs())
    intra = torch.exp(n * scaled**2)
    inter = torch.tanh(t * t.sum(dim=0, keepdim=True))
    beta = intra * inter  # (n, d)

    k = min(math.floor(d * (1 - keep_ratio)), d - 1)
    threshold = beta.sort(dim=1).values[:, k : k + 1]  # (n, 1)
    top = beta.max(dim=1, keepdim=True).values
    denom = top - threshold
    dead = flat | (denom <= 0)
    s = (torch.maximum(beta, threshold) - threshold) / torch.where(dead, 1, denom)
    s = torch.where(dead, torch.zeros_like(s), s)  # (n, d), in [0, 1]

    numerator = (weights.float()[:, None] * s * c).sum(dim=0)
    return numerator / s.sum(dim=0).clamp_min(1e-12)


MERGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "ta": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "pcb": pcb,
}


def get_merge_method(name: str) -> Callable[..., torch.Tensor]:
    if name not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {name!r}; choose one of {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[name]


def merge_task_vectors(
    task_vectors: list[TaskVector],
    weights: torch.Tensor | list[float],
    method: str = "ta",
    **params,
) -> TaskVector:
    """Merge objective vectors module by module.

    Args:
        task_vectors: n objective vectors over the same modules.
        weights: (n,) preference weights lambda.
        method: a key of MERGE_METHODS.
    Returns:
        module name -> merged dense delta (out, in).
    """
    fn = get_merge_method(method)
    inspect.signature(fn).bind(None, None, **params)  # unknown params fail here (TypeError), on every path
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.shape != (len(task_vectors),):
        raise ValueError(f"need one weight per task vector: {len(task_vectors)} vs {tuple(weights.shape)}")
    modules = list(task_vectors[0])
    for i, tv in enumerate(task_vectors[1:], 1):
        if set(tv) != set(modules):
            raise ValueError(f"task vector {i} covers other modules than task vector 0")
    merged: TaskVector = {}
    for name in modules:
        deltas = [tv[name] for tv in task_vectors]
        if method == "ta" and all(isinstance(d, LowRankDelta) for d in deltas):
            merged[name] = _low_rank_sum(deltas, weights, params.get("scale", 1.0))
            continue
        dense = [as_dense(d) for d in deltas]
        stacked = torch.stack([m.reshape(-1) for m in dense])  # (n, d)
        merged[name] = fn(stacked, weights, **params).reshape(dense[0].shape)
    return merged


def _low_rank_sum(deltas: list[LowRankDelta], weights: torch.Tensor, scale: float) -> LowRankDelta:
    """Task arithmetic of factorised deltas, exactly and still factorised:
    c sum_i w_i s_i B_i A_i = [c w_1 s_1 B_1 | ... ] [A_1; ...] (rank sum_i r_i), so its SVD
    is the cheap QR route rather than a full decomposition of a dense matrix."""
    b = torch.cat([scale * float(w) * d.scale * d.B.float() for d, w in zip(deltas, weights)], 1)
    return LowRankDelta(B=b, A=torch.cat([d.A.float() for d in deltas], 0))
