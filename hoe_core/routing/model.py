"""Attach HoE layers to a Hugging Face causal LM, and route preferences through them.

    HoEModel
      .model          the HF model; every targeted linear is now an HoELinear
      .anchors        (K, N): E expert anchors, then P router anchors
      .routing(prefs) context manager: per-row preferences -> anchor weights -> layers

The model object is shared and never mutated per request: a preference only exists
inside the ``routing`` block of the call that made it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hoe_core.config import LLAMA_TARGETS
from hoe_core.experts.task_svd import LowRankDelta
from hoe_core.routing.context import Routing, use_routing
from hoe_core.routing.kernel import group_siblings
from hoe_core.routing.layer import HoELinear
from hoe_core.routing.preference import normalize_preference, route
from hoe_core.routing.router import RouterExpert


@dataclass
class LoraExpert:
    """A LoRA expert: its anchor preference (N,) and factors per module."""

    name: str
    anchor: np.ndarray
    factors: dict[str, LowRankDelta]


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations flow in (fp32 for bnb-quantised models on CPU)."""
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return torch.float32


class HoEModel:
    """A backbone with E LoRA experts and P router experts in every targeted linear."""

    def __init__(
        self,
        model: nn.Module,
        objectives: Sequence[str],
        experts: Sequence[LoraExpert],
        routers: Sequence[RouterExpert] = (),
        targets: Sequence[str] = LLAMA_TARGETS,
    ) -> None:
        self.model = model
        self.objectives = list(objectives)
        self.expert_names = [e.name for e in experts]
        self.routers = list(routers)
        n = len(self.objectives)
        anchors = [e.anchor for e in experts] + [r.anchor for r in routers]
        self.anchors = np.stack([np.asarray(a, dtype=np.float64) for a in anchors])  # (K, N)
        if self.anchors.shape[1] != n:
            raise ValueError(f"anchors must have {n} coordinates (objectives {self.objectives})")
        if not experts:
            raise ValueError("an HoE model needs at least one LoRA expert")
        index = {name: i for i, name in enumerate(self.expert_names)}
        subsets = []
        for r in routers:
            missing = [x for x in r.experts if x not in index]
            if missing:
                raise ValueError(f"router {r.name!r} gates over unknown experts {missing}")
            subsets.append([index[x] for x in r.experts])
        self.layers: dict[str, HoELinear] = {}
        dtype = compute_dtype(model)
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] not in targets or not isinstance(module, nn.Linear):
                continue
            factors = [_factors(e.factors.get(name)) for e in experts]
            gates = [
                (s, *r.gates[name]) if name in r.gates else (s, None, None) for s, r in zip(subsets, routers)
            ]
            layer = HoELinear(module, name, factors, gates, dtype=dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"no linear named {list(targets)} found in the model")
        group_siblings(self.layers)  # q/k/v and gate/up share one inference kernel
        unknown = {m for e in experts for m in e.factors} - set(self.layers)
        if unknown:
            raise ValueError(f"experts touch modules the model lacks: {sorted(unknown)[:3]}...")

    def detach(self) -> nn.Module:
        """Put the original linears back; returns the bare model (this object is unusable after)."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, layer.base)
        self.layers = {}
        return self.model

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    def anchor_weights(self, preferences: np.ndarray | Sequence[Sequence[float]]) -> torch.Tensor:
        """Route each row's preference (B, N) to anchor weights (B, K) (SPEC section 4)."""
        prefs = [normalize_preference(p, len(self.objectives)) for p in preferences]
        return torch.tensor(np.stack([route(p, self.anchors) for p in prefs]), dtype=torch.float32)

    @contextmanager
    def routing(
        self,
        preferences: np.ndarray | Sequence[Sequence[float]] | None = None,
        anchor_weights: torch.Tensor | None = None,
        record_gates: bool = False,
    ) -> Iterator[Routing]:
        """Run the model inside this block with per-row preferences (B, N) or raw anchor
        weights (B, K)."""
        if (preferences is None) == (anchor_weights is None):
            raise ValueError("give exactly one of preferences or anchor_weights")
        weights = anchor_weights if anchor_weights is not None else self.anchor_weights(preferences)
        if weights.shape[1] != len(self.anchors):
            raise ValueError(f"anchor weights need {len(self.anchors)} columns, got {weights.shape[1]}")
        with use_routing(weights, record_gates=record_gates) as r:
            yield r

    def router_parameters(self, router: int) -> list[nn.Parameter]:
        """The gate parameters of router ``router`` across all layers (frozen, as the whole
        model is, until a trainer sets ``requires_grad_(True)``)."""
        return [p for layer in self.layers.values() for p in layer.gates[router].parameters()]

    def set_router_prior(self, router: int, weights: Sequence[float], floor: float = 0.1) -> None:
        """Start router ``router``'s gates, in every layer, at the mixture ``weights`` (|S|,)
        over its subset: zero input weights and bias = log((1 - floor) w + floor / |S|).

        The floor keeps every expert reachable by gradient (softmax of -inf never moves).
        """
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)
        size = len(self.routers[router].experts)
        if w.shape != (size,) or (w < 0).any() or not torch.isclose(w.sum(), torch.tensor(1.0)):
            raise ValueError(f"router prior needs {size} non-negative weights summing to 1, got {w.tolist()}")
        bias = torch.log((1 - floor) * w + floor / size)
        with torch.no_grad():
            for layer in self.layers.values():
                gate = layer.gates[router]
                gate.weight.zero_()
                gate.bias.copy_(bias.to(gate.bias))
                layer.gates_changed()

    def export_router(self, router: int) -> RouterExpert:
        """The router's current gates as a RouterExpert (for saving after training)."""
        r = self.routers[router]
        gates = {
            name: (
                layer.gates[router].weight.detach().float().cpu(),
                layer.gates[router].bias.detach().float().cpu(),
            )
            for name, layer in self.layers.items()
        }
        return RouterExpert(name=r.name, anchor=r.anchor, experts=r.experts, gates=gates)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the backbone, the LoRA experts and the router experts."""
        experts = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in self.layers.values())
        routers = sum(p.numel() for layer in self.layers.values() for p in layer.gates.parameters())
        hoe_ids = {id(p) for layer in self.layers.values() for p in layer.gates.parameters()}
        backbone = sum(_numel(p) for p in self.model.parameters() if id(p) not in hoe_ids)
        return {"backbone": backbone, "experts": experts, "routers": routers}


def _factors(delta: LowRankDelta | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    if delta is None:
        return None
    return (delta.B.float() * delta.scale, delta.A.float())


def _numel(p: torch.Tensor) -> int:
    # bnb Params4bit stores two 4-bit values per byte; count logical parameters.
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(np.prod(shape)) if shape is not None else p.numel()
