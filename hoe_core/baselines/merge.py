"""Training-free merging at the preference (SPEC section 6): tau_lambda = Merge({tau_i}, lambda)
of the single experts' deltas by task arithmetic or TIES, recomputed when lambda changes,
and added to every targeted linear as a dense delta:

    y = W_pre x + tau_lambda x            tau_lambda (out, in), one per module

TIES's trim and sign election make tau_lambda full rank, so it is kept dense (a second
matmul per linear) rather than refactored to low rank, and added by a forward hook on
each HoE layer, so that quantised backbones work too. The active delta travels in a
context variable, like the routing: concurrent calls never see each other's merge.
With ``ta`` (scale 1) this is Rewarded Soups' theta_lambda computed a second way.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from hoe_core.baselines.soups import base_model, vertex_experts
from hoe_core.config import DecodingConfig
from hoe_core.evaluation.front import Method
from hoe_core.experts.merging import merge_task_vectors
from hoe_core.experts.task_svd import LowRankDelta, as_dense
from hoe_core.routing.model import HoEModel
from hoe_core.routing.preference import normalize_preference

_DELTAS: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar(
    "hoe_merge_deltas", default=None
)


def _add_delta(module, inputs, output):
    deltas = _DELTAS.get()
    if deltas is None or module.name not in deltas:
        return output
    delta = deltas[module.name]  # (out, in)
    return output + (inputs[0].to(delta.dtype) @ delta.T).to(output.dtype)


_HOOK_LOCK = threading.Lock()


def _install_hooks(hoe: HoEModel) -> None:
    if getattr(hoe, "_merge_hooks", None) is None:
        hoe._merge_hooks = [layer.register_forward_hook(_add_delta) for layer in hoe.layers.values()]


@contextmanager
def use_deltas(hoe: HoEModel, deltas: dict[str, torch.Tensor]):
    """Inside the block every HoE layer named in ``deltas`` adds ``x @ delta.T``."""
    with _HOOK_LOCK:
        _install_hooks(hoe)
    token = _DELTAS.set(deltas)
    try:
        yield
    finally:
        _DELTAS.reset(token)


class MergeAtPreference:
    """Merge the single experts' deltas at a preference with one registered method.

    Args:
        factors: per objective, the single expert's factors (module -> LowRankDelta).
        method: a name in :data:`hoe_core.experts.merging.MERGE_METHODS` (``ta``, ``ties``, ...).
        params: that method's parameters (e.g. ``density`` for TIES).
    """

    def __init__(self, factors: Sequence[dict[str, LowRankDelta]], method: str, device, **params) -> None:
        self.factors, self.method, self.params, self.device = list(factors), method, params, device
        self._cached: tuple[tuple[float, ...], dict[str, torch.Tensor]] | None = None

    def deltas(self, lam: np.ndarray) -> dict[str, torch.Tensor]:
        """Module -> dense tau_lambda (out, in), float32; the last lambda's merge is cached."""
        key = tuple(np.round(np.asarray(lam, float), 12))
        if self._cached is None or self._cached[0] != key:
            merged = merge_task_vectors(self.factors, list(key), self.method, **self.params)
            dense = {m: as_dense(d).to(self.device) for m, d in merged.items()}  # TA may stay factorised
            self._cached = (key, dense)
        return self._cached[1]


def merge_method(
    hoe: HoEModel,
    tokenizer,
    decoding: DecodingConfig,
    factors: Sequence[dict[str, LowRankDelta]],
    method: str,
    **params,
) -> Method:
    """Generate with theta_pre + Merge({tau_i}, lambda) (training-free merging at lambda)."""
    if len(factors) != len(hoe.objectives):
        raise ValueError(f"need one expert per objective ({len(hoe.objectives)}), got {len(factors)}")
    merger = MergeAtPreference(factors, method, next(hoe.model.parameters()).device, **params)
    plain = base_model(hoe, tokenizer, decoding)
    with _HOOK_LOCK:
        _install_hooks(hoe)  # here, not per call: two threads must never both install them

    def run(prompts: Sequence[str], lam: np.ndarray) -> list[str]:
        lam = normalize_preference(lam, len(hoe.objectives))
        with use_deltas(hoe, merger.deltas(lam)):
            return plain(prompts, lam)

    return run


def single_factors(hoe: HoEModel, experts: Sequence) -> list[dict[str, LowRankDelta]]:
    """The factors of each objective's single expert, from the bundle's loaded experts."""
    by_name = {e.name: e for e in experts}
    return [by_name[hoe.expert_names[i]].factors for i in vertex_experts(hoe)]
