"""The reward contract and reward normalisation.

Every reward model scores a batch of (prompt, response) pairs with a raw float, higher =
better. Raw scales differ per reward (a log-odds, a VADER compound in [-1, 1], a Flesch
score around 0..120), so training code z-scores each one with a :class:`Normalizer` fitted
on samples of the backbone; the bundle manifest stores it with :meth:`Normalizer.to_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

STD_FLOOR = 1e-6


@runtime_checkable
class RewardModel(Protocol):
    """Scores (prompt, response) pairs; batches internally."""

    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """B prompts and B responses -> (B,) float64 raw rewards, higher = better."""
        ...


class BatchReward:
    """Base of the registered rewards: ``from_params`` builds the frozen config (unknown
    keys fail by name); ``score`` validates the batch, answers an empty one and calls
    ``_score`` with lists of at least one pair."""

    name: str
    config_cls: type

    @classmethod
    def from_params(cls, **params: Any):
        from hoe_core.config import from_dict

        return cls(from_dict(cls.config_cls, params))

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """B prompts and B responses -> (B,) float64 raw rewards, higher = better."""
        prompts, responses = check_batch(prompts, responses)
        if not responses:
            return np.zeros(0, dtype=np.float64)
        return np.asarray(self._score(prompts, responses), dtype=np.float64)

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        raise NotImplementedError


def check_batch(prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[str], list[str]]:
    """Validate a batch: equal lengths, every item a str. Returns both as lists."""
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be sequences of strings, not a single string")
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; they must pair up")
    for what, items in (("prompt", prompts), ("response", responses)):
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise TypeError(f"{what} {i} must be a str, got {type(text).__name__}")
    return prompts, responses


@dataclass(frozen=True)
class Normalizer:
    """z-score of a raw reward: ``(raw - mean) / max(std, 1e-6)``."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Normalizer.{name} must be a finite number, got {value!r}")
        if self.std < 0:
            raise ValueError(f"Normalizer.std must be >= 0, got {self.std}")

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """raw (...,) -> normalised (...,) float64."""
        return (np.asarray(raw, dtype=np.float64) - self.mean) / max(self.std, STD_FLOOR)

    def to_dict(self) -> dict[str, float]:
        return {"mean": float(self.mean), "std": float(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        if not isinstance(data, dict) or set(data) != {"mean", "std"}:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"Normalizer.from_dict needs exactly the keys ['mean', 'std'], got {keys}")
        return cls(mean=float(data["mean"]), std=float(data["std"]))


def fit_normalizer(raw: np.ndarray) -> Normalizer:
    """Mean and (population) std of raw rewards (N,), N >= 1, all finite."""
    raw = np.asarray(raw, dtype=np.float64).reshape(-1)
    if raw.size == 0:
        raise ValueError("fit_normalizer needs at least one raw reward")
    if not np.isfinite(raw).all():
        raise ValueError(f"fit_normalizer got {int((~np.isfinite(raw)).sum())} non-finite reward(s)")
    return Normalizer(mean=float(raw.mean()), std=float(raw.std()))
