"""Baselines that mix the single-objective experts by fixed weights: the base model, each
expert alone, and Rewarded Soups (SPEC section 6).

Every single-objective model is theta_i = theta_pre + tau_i with tau_i = B_i A_i, the
bundle's expert at vertex i (the task-SVD of the DPO fine-tune; the recipe's rank sweep
reports how much of each expert's own-objective gain that rank keeps). Rewarded Soups
interpolates the weights,

    theta_lambda = sum_i lambda_i theta_i = theta_pre + sum_i lambda_i B_i A_i     (sum lambda = 1)

which is linear in the deltas, so it runs unmerged through the HoE layers with anchor
weights lambda on the single experts: the same model as re-merging the weights for every
lambda, without touching the (possibly quantised) backbone weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from hoe_core.config import DecodingConfig
from hoe_core.evaluation.front import Method, model_method
from hoe_core.generation import generate
from hoe_core.routing.model import HoEModel
from hoe_core.routing.preference import normalize_preference


def vertex_experts(hoe: HoEModel, names: Sequence[str] | None = None) -> list[int]:
    """Index of the single-objective expert of each objective (the expert anchored at the
    vertex e_i), in objective order. ``names`` restricts the search to these experts."""
    n = len(hoe.objectives)
    found = []
    for i, objective in enumerate(hoe.objectives):
        vertex = np.eye(n)[i]
        hits = [
            e
            for e in range(hoe.n_experts)
            if np.allclose(hoe.anchors[e], vertex) and (names is None or hoe.expert_names[e] in names)
        ]
        if not hits:
            raise ValueError(
                f"no single-objective expert for {objective!r} (an expert anchored at {vertex.tolist()}); "
                f"experts: {hoe.expert_names}"
            )
        found.append(hits[0])
    return found


def mixture_weights(hoe: HoEModel, experts: Sequence[int], lam: np.ndarray, batch: int) -> torch.Tensor:
    """Anchor weights (batch, K) putting lambda_i on expert ``experts[i]`` and 0 elsewhere."""
    w = torch.zeros(batch, len(hoe.anchors))
    w[:, list(experts)] = torch.as_tensor(np.asarray(lam, float), dtype=torch.float32)
    return w


def mixture_method(hoe: HoEModel, tokenizer, decoding: DecodingConfig, experts: Sequence[int]) -> Method:
    """Generate with theta_pre + sum_i lambda_i tau_{experts[i]} (Rewarded Soups)."""

    def run(prompts: Sequence[str], lam: np.ndarray) -> list[str]:
        lam = normalize_preference(lam, len(hoe.objectives))
        weights = mixture_weights(hoe, experts, lam, len(prompts))
        prefs = [lam] * len(prompts)
        return [
            g.text for g in generate(hoe, tokenizer, list(prompts), prefs, decoding, anchor_weights=weights)
        ]

    return run


def rewarded_soups(hoe: HoEModel, tokenizer, decoding: DecodingConfig) -> Method:
    return mixture_method(hoe, tokenizer, decoding, vertex_experts(hoe))


def single_expert(hoe: HoEModel, tokenizer, decoding: DecodingConfig, objective: str) -> Method:
    """Objective ``objective``'s expert alone (the preference is ignored)."""
    if objective not in hoe.objectives:
        raise ValueError(f"unknown objective {objective!r}; objectives: {hoe.objectives}")
    inner = rewarded_soups(hoe, tokenizer, decoding)
    vertex = np.eye(len(hoe.objectives))[hoe.objectives.index(objective)]
    return lambda prompts, _lam: inner(prompts, vertex)


def base_model(hoe: HoEModel, tokenizer, decoding: DecodingConfig) -> Method:
    """The backbone alone: HoE layers add nothing outside a routing block."""
    return model_method(hoe.model, tokenizer, decoding)


class MergedSoup:
    """Rewarded Soups as the paper runs it: theta_lambda = theta_pre + sum_i lambda_i tau_i
    written into the weights of a dedicated float backbone, re-merged whenever lambda
    changes. The benchmark uses it for RS's re-merge cost; the evaluation runs the same
    model unmerged (see the module docstring), which needs no copy and no re-merge.

    Args:
        model: a bare float (fp32/bf16) backbone this object owns: its weights get overwritten.
        factors: per objective, the single expert's factors (module -> LowRankDelta).
    """

    def __init__(self, model: torch.nn.Module, factors: Sequence[dict]) -> None:
        names = sorted({m for f in factors for m in f})
        self.factors = list(factors)
        self.linears = {name: model.get_submodule(name) for name in names}
        for name, linear in self.linears.items():
            weight = getattr(linear, "weight", None)
            if (
                not isinstance(weight, torch.Tensor)
                or not weight.dtype.is_floating_point
                or weight.dim() != 2
            ):
                raise ValueError(
                    f"{name}: Rewarded Soups re-merges float weights; this layer is {type(linear).__name__}"
                )
        self.pre = {name: linear.weight.detach().clone() for name, linear in self.linears.items()}

    def stored_bytes(self) -> int:
        """The pre-trained weights kept to re-merge from (on top of the model itself)."""
        return sum(w.numel() * w.element_size() for w in self.pre.values())

    @torch.no_grad()
    def set_preference(self, lam: Sequence[float]) -> float:
        """Re-merge the weights at lambda (N,); returns the seconds it took."""
        lam = normalize_preference(lam, len(self.factors))
        start = time.perf_counter()
        for name, linear in self.linears.items():
            merged = self.pre[name].float().clone()
            for weight, factors in zip(lam, self.factors):
                delta = factors.get(name)
                if delta is not None and weight > 0:
                    merged.addmm_(delta.B.float() * (delta.scale * weight), delta.A.float())
            linear.weight.copy_(merged)
        return time.perf_counter() - start
