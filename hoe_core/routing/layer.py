"""The HoE layer: a frozen linear plus E LoRA experts mixed by per-token gates.

    x (B, T, in) ──► base(x) ────────────────────────────────────────────┐
        │                                                                 ▼
        ├──► A_cat x  (B, T, R) ──► * g[..., owner] ──► B_cat (·) ──►  y (B, T, out)
        │                              ▲
        └──► routers: softmax(W_rho x) ┘  g = sum_k w_k eta_k(x)   (B, T, E)

A_cat (R, in) and B_cat (out, R) are the experts' factors concatenated along the rank
axis (R = sum of ranks), each expert's scale folded into B; ``owner[j]`` is the expert of
rank row j. The anchor weights w (B, K) come per call from :mod:`hoe_core.routing.context`
(K = E expert anchors, one-hot gates, then P router anchors), so each batch row carries
its own preference and no state is shared between calls. Experts and routers with zero
weight in the whole batch are skipped. Gates depend on the current token only, so the KV
cache stays valid during ``generate``.

Inference (no router being trained) runs the per-call kernel of
:mod:`hoe_core.routing.kernel`: everything resolved up front, the gates' weights stacked
under A (one matmul gives h = A x and the gate logits), and sibling layers that read the
same input (q/k/v, gate/up) served by one kernel. Training keeps the plain differentiable
path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as _module

from hoe_core.routing.context import RoutePlan, current_routing
from hoe_core.routing.kernel import SiblingGroup


class HoELinear(nn.Module):
    """Wraps a linear (``nn.Linear``, bnb ``Linear4bit`` / ``Linear8bitLt``) with experts.

    Args:
        base: the frozen linear; kept as is (quantised layers stay quantised).
        name: the module's name in the model, used as a key for routers and gate records.
        expert_factors: per expert (in anchor order), ``(B (out, r), A (r, in))`` with the
            scale folded into B, or None where an expert does not touch this module.
        routers: per router, ``(subset of expert indices, gate weight (|S|, in), bias (|S|,))``.
        dtype: storage dtype of the factors and gates (the model's compute dtype).
    """

    def __init__(
        self,
        base: nn.Module,
        name: str,
        expert_factors: list[tuple[torch.Tensor, torch.Tensor] | None],
        routers: list[tuple[list[int], torch.Tensor, torch.Tensor]] = (),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.n_experts = len(expert_factors)
        device = _device_of(base)
        a_parts, b_parts, owner = [], [], []
        for e, factors in enumerate(expert_factors):
            if factors is None:
                continue
            b, a = factors
            if a.shape[1] != self.in_features or b.shape[0] != self.out_features:
                raise ValueError(
                    f"{name}: expert {e} has shape ({b.shape[0]}, {a.shape[1]}), layer is "
                    f"({self.out_features}, {self.in_features})"
                )
            a_parts.append(a)
            b_parts.append(b)
            owner += [e] * a.shape[0]
        a_cat = torch.cat(a_parts, 0) if a_parts else torch.zeros(0, self.in_features)
        b_cat = torch.cat(b_parts, 1) if b_parts else torch.zeros(self.out_features, 0)
        self.register_buffer("lora_A", a_cat.to(device, dtype).contiguous())  # (R, in)
        self.register_buffer("lora_B", b_cat.to(device, dtype).contiguous())  # (out, R)
        self.register_buffer("owner", torch.tensor(owner, dtype=torch.long, device=device))
        self.subsets: list[list[int]] = []
        self._cache: dict = {}  # _Active per (active set, device, dtype)
        self.has_experts = a_cat.shape[0] > 0
        SiblingGroup([self])  # alone until group_siblings joins it to its siblings
        self.gates = nn.ModuleList()
        for subset, weight, bias in routers:
            self.add_router(subset, weight, bias, dtype=dtype)

    def add_router(
        self,
        subset: list[int],
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> nn.Linear:
        """Append a router expert's gate over ``subset``; zero init gives uniform gates."""
        if not subset or max(subset) >= self.n_experts or min(subset) < 0:
            raise ValueError(f"{self.name}: router subset {subset} out of range 0..{self.n_experts - 1}")
        gate = nn.Linear(self.in_features, len(subset), device=_device_of(self.base), dtype=dtype)
        with torch.no_grad():
            gate.weight.copy_(weight if weight is not None else torch.zeros_like(gate.weight))
            gate.bias.copy_(bias if bias is not None else torch.zeros_like(gate.bias))
        gate.requires_grad_(False)  # frozen like the backbone; router training unfreezes its own
        self.subsets.append(list(subset))
        self.gates.append(gate)
        self._cache.clear()
        self.group.stacks.clear()
        self.group.kernels.clear()
        return gate

    def expert_gates(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Per-token distribution over experts.

        Args:
            x: (B, T, in) module input.
            weights: (B, K) anchor weights, K = n_experts + n_routers, rows on the simplex.
        Returns:
            g: (B, T, E), sums to 1 over E wherever the row's weights do.
        """
        bsz, seq = x.shape[0], x.shape[1]
        g = weights[:, None, : self.n_experts].to(x.dtype).expand(bsz, seq, -1).clone()
        active_routers = (weights[:, self.n_experts :] > 0).any(0).nonzero().flatten().tolist()
        for p in active_routers:
            probs = torch.softmax(self.gates[p](x.to(self.gates[p].weight.dtype)).float(), -1)
            w_p = weights[:, self.n_experts + p].to(probs.dtype)[:, None, None]  # (B, 1, 1)
            g[..., self.subsets[p]] += (w_p * probs).to(g.dtype)  # (B, T, |S_p|)
        return g

    def _active(self, plan: RoutePlan) -> _Active:
        """The plan's active experts in this layer (cached per active set, device and dtype)."""
        key = (plan.key, plan.device, self.lora_A.dtype)
        act = self._cache.get(key)
        if act is None:
            keep = plan.active.to(self.owner.device)[self.owner]  # (R,) rank rows kept
            owner = self.owner[keep]
            maps = {
                p: (owner[None, :] == torch.tensor(self.subsets[p], device=owner.device)[:, None])
                .to(self.lora_A.dtype)
                .to(plan.device)
                for p, _ in plan.routers
            }  # router p's gate outputs -> the rank rows of its experts, (|S_p|, R_a)
            b = self.lora_B[:, keep].to(plan.device)
            act = _Active(
                a=self.lora_A[keep].to(plan.device),
                b=b,
                b_t=b.T.contiguous(),
                owner=owner.to(plan.device),
                maps=maps,
            )
            self._cache[key] = act
        return act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = current_routing()
        if routing is None or not self.has_experts:
            return self.base(x)
        x3 = x[:, None] if x.dim() == 2 else x  # (B, T, in)
        if routing.record_gates:
            routing.record(self.name, self.expert_gates(x3, routing.weights_for(x3.shape[0]).to(x3.device)))
        if torch.is_grad_enabled() and any(g.weight.requires_grad for g in self.gates):
            return self._forward_trainable(x, x3, routing)
        # inference (no router being trained): the group's per-call kernel, built on first use
        key = (self.group, x3.shape[0])
        kernel = routing.kernels.get(key)
        # rebuilt when the gates may have changed since: a trainable forward or
        # gates_changed() since (the epoch), or a trainable gate updated in place (an
        # optimiser step between two forwards of one routing block; the group's first member
        # -- q, gate: HF calls it first -- checks, its siblings then read the new kernel).
        # Frozen gates edited in place inside one block are seen from the next block on.
        group = self.group
        if (
            kernel is None
            or kernel.epoch != group.epoch
            or (self.slot == 0 and kernel.versions and not kernel.current())
        ):
            kernel = routing.kernels[key] = group.kernel(routing, x3)
        return kernel(self, x, x3)

    def gates_changed(self) -> None:
        """Tell this layer's inference kernels, in every routing block, that its gates may
        have changed (in place, frozen or not): each rebuilds on its next call. Trainable
        forwards call it; so does code that edits gates directly (``set_router_prior``)."""
        self.group.epoch += 1

    def _base_call(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen linear's output; its ``forward`` directly when nothing hooks it (one
        ``Module.__call__`` less per layer and token)."""
        base = self._modules["base"]  # not self.base: Module.__getattr__ runs after a failed lookup
        if (
            base._forward_hooks
            or base._forward_pre_hooks
            or base._backward_hooks
            or base._backward_pre_hooks
            or _module._global_forward_hooks
            or _module._global_forward_pre_hooks
            or _module._global_backward_hooks
            or _module._global_backward_pre_hooks
        ):
            return base(x)
        return base.forward(x)

    def _forward_trainable(self, x: torch.Tensor, x3: torch.Tensor, routing) -> torch.Tensor:
        self.gates_changed()  # an optimiser step may follow
        y = self.base(x)
        plan = routing.plan(x3.shape[0], self.n_experts, self.subsets, x3.device)
        act = self._active(plan)
        if act.a.shape[0] == 0:
            return y
        delta = self._mixture_trainable(x3, plan, act)
        if x is not x3:
            delta = delta[:, 0]
        return y + delta.to(y.dtype)

    def _mixture_trainable(self, x: torch.Tensor, plan: RoutePlan, act: _Active) -> torch.Tensor:
        """Reference path, differentiable in the router gates. x (B, T, in) -> (B, T, out)."""
        xa = x.to(act.a.dtype)
        g = plan.expert_weights.to(act.a.dtype)[..., act.owner]  # (B, 1, R_a): fixed part
        for p, w_p in plan.routers:  # token-dependent part: sum_p w_p softmax(W_p x) on S_p
            probs = torch.softmax(self.gates[p](xa).float(), -1).to(act.a.dtype)  # (B, T, |S_p|)
            g = g + (w_p.to(act.a.dtype) * probs) @ act.maps[p]  # (B, T, R_a)
        return ((xa @ act.a.T) * g) @ act.b.T


@dataclass
class _Active:
    """One layer's factors restricted to the active experts."""

    a: torch.Tensor  # (R_a, in)
    b: torch.Tensor  # (out, R_a)
    b_t: torch.Tensor  # (R_a, out), contiguous: the inference kernels' right factor
    owner: torch.Tensor  # (R_a,) expert of each rank row
    maps: dict[int, torch.Tensor]  # active router p -> (|S_p|, R_a) one-hot


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")
