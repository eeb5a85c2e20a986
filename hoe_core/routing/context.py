"""Per-call routing state: the anchor weights travel with the request, not the model.

A :class:`Routing` lives in a ``contextvars.ContextVar`` for the duration of one forward
or ``generate`` call. Context variables are per thread (and per asyncio task), so two
users generating at once on one shared model never see each other's mixture. Outside a
``use_routing`` block the HoE layers add nothing: the model is the bare backbone.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

_ROUTING: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("hoe_routing", default=None)


@dataclass(frozen=True)
class RoutePlan:
    """What every HoE layer needs from the anchor weights, computed once per call.

    Attributes:
        expert_weights: (B, 1, E) weights of the expert anchors (one-hot gates).
        routers: (router index, (B, 1, 1) weight) for routers with weight in some row.
        active: (E,) experts with nonzero gate anywhere in the batch; the rest are skipped.
        key: active experts and routers as a tuple, to cache per-layer factor selections.
        weights_key: the (B, K) weights themselves as a tuple, to cache per-preference kernels.
        weights: the (B, K) weights as a float32 numpy array (the CPU kernels' gating maps).
    """

    expert_weights: torch.Tensor
    routers: list[tuple[int, torch.Tensor]]
    active: torch.Tensor
    key: tuple
    device: torch.device
    weights_key: tuple = ()
    weights: np.ndarray | None = None


@dataclass
class Routing:
    """Anchor weights for a batch, and optional gate recording.

    Attributes:
        weights: (B, K) anchor weights per batch row (rows on the simplex).
        record_gates: keep every layer's gates (the app's token x expert heatmap).
        gates: module name -> list of (B, T, E) gate tensors, one per forward step.
    """

    weights: torch.Tensor
    record_gates: bool = False
    gates: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    plans: dict[tuple, RoutePlan] = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)  # (layer, batch) -> that layer's mixture for this call

    def weights_for(self, batch: int) -> torch.Tensor:
        """(batch, K): rows repeated when generate expands the batch (beams, samples)."""
        rows = self.weights.shape[0]
        if batch == rows:
            return self.weights
        if batch % rows:
            raise RuntimeError(f"batch of {batch} rows cannot use routing weights for {rows}")
        return self.weights.repeat_interleave(batch // rows, dim=0)

    def plan(self, batch: int, n_experts: int, subsets: list[list[int]], device: torch.device) -> RoutePlan:
        """The RoutePlan for this batch size, expert layout and device (cached per call)."""
        lookup = (batch, n_experts, tuple(map(tuple, subsets)), device)
        plan = self.plans.get(lookup)
        if plan is None:
            w = self.weights_for(batch).to(device)  # (B, K)
            active = (w[:, :n_experts] > 0).any(0).cpu()
            routers = []
            for p, subset in enumerate(subsets):
                w_p = w[:, n_experts + p]
                if bool((w_p > 0).any()):
                    routers.append((p, w_p[:, None, None]))
                    active[subset] = True
            key = (tuple(active.tolist()), tuple(p for p, _ in routers))
            plan = RoutePlan(
                w[:, None, :n_experts],
                routers,
                active,
                key,
                device,
                (w.shape, *w.flatten().tolist()),
                w.detach().float().cpu().numpy(),
            )
            self.plans[lookup] = plan
        return plan

    def record(self, module: str, gates: torch.Tensor) -> None:
        self.gates.setdefault(module, []).append(gates.detach().float().cpu())


# () -> Routing | None: the routing of the current block, or None outside one. The context
# variable's own ``get`` (no Python frame: every HoE layer asks once per token)
current_routing = _ROUTING.get


@contextmanager
def use_routing(weights: torch.Tensor, record_gates: bool = False) -> Iterator[Routing]:
    """Route every HoE layer called inside the block with ``weights`` (B, K)."""
    if weights.dim() != 2:
        raise ValueError(f"anchor weights must be (batch, anchors), got {tuple(weights.shape)}")
    with activate(Routing(weights=weights.detach(), record_gates=record_gates)) as routing:
        yield routing


@contextmanager
def activate(routing: Routing) -> Iterator[Routing]:
    """Route with an existing :class:`Routing` again (a decoding loop that calls the model
    step by step keeps one per model, so the layers' per-call kernels are built once)."""
    token = _ROUTING.set(routing)
    try:
        yield routing
    finally:
        _ROUTING.reset(token)
