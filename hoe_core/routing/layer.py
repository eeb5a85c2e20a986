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
"""

from __future__ import annotations

import torch
from torch import nn

from hoe_core.routing.context import current_routing


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
        self.subsets.append(list(subset))
        self.gates.append(gate)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        routing = current_routing()
        if routing is None or self.lora_A.shape[0] == 0:
            return y
        squeeze = x.dim() == 2
        x3 = x[:, None] if squeeze else x  # (B, T, in)
        weights = routing.weights_for(x3.shape[0]).to(x3.device)  # (B, K)
        g = self.expert_gates(x3, weights)  # (B, T, E)
        if routing.record_gates:
            routing.record(self.name, g)
        active = g.detach().flatten(0, 1).abs().amax(0) > 0  # (E,)
        a, b, owner = self.lora_A, self.lora_B, self.owner
        if not bool(active.all()):
            keep = active[owner]  # (R,) rank rows of active experts
            a, b, owner = a[keep], b[:, keep], owner[keep]
            if a.shape[0] == 0:
                return y
        h = x3.to(a.dtype) @ a.T  # (B, T, R_active)
        h = h * g.to(a.dtype)[..., owner]
        delta = h @ b.T  # (B, T, out)
        if squeeze:
            delta = delta[:, 0]
        return y + delta.to(y.dtype)


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")
