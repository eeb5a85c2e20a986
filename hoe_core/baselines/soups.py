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
