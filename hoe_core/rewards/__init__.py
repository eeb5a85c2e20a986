"""Offline reward models, one per objective, behind one contract and one registry.

    get_reward("helpful").score(prompts, responses) -> (B,) float64, higher = better

| name     | raw reward                                                            | module       |
|----------|-----------------------------------------------------------------------|--------------|
| helpful  | log-odds that the response answers the prompt (MiniLM pair head)      | helpful.py   |
| harmless | log[(1 - p_profanity) * p_harmless_head], in [log 1e-8, 0]             | harmless.py  |
| humor    | log-odds that the response is a joke (MiniLM head)                    | humor.py     |
| positive | VADER compound of the response, in [-1, 1]                            | lexical.py   |
| concise  | -log(1 + words / ref_words)                                           | lexical.py   |
| simple   | Flesch reading ease (pyphen syllables; never downloads NLTK data)     | lexical.py   |

``get_reward(name, **params)`` builds the reward's frozen config from ``params`` (unknown
keys fail by name). Heavy imports (torch, transformers, sklearn) happen on first use only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hoe_core.rewards.base import Normalizer, RewardModel, check_batch, fit_normalizer

REWARD_NAMES: tuple[str, ...] = ("helpful", "harmless", "humor", "positive", "concise", "simple")


def _factories() -> dict[str, Callable[..., RewardModel]]:
    from hoe_core.rewards import harmless, helpful, humor, lexical

    return {
        "helpful": helpful.HelpfulReward.from_params,
        "harmless": harmless.HarmlessReward.from_params,
        "humor": humor.HumorReward.from_params,
        "positive": lexical.PositiveReward.from_params,
        "concise": lexical.ConciseReward.from_params,
        "simple": lexical.SimpleReward.from_params,
    }


def get_reward(name: str, **params: Any) -> RewardModel:
    """The reward model registered under ``name``, configured by ``params``.

    Raises:
        ValueError: unknown name (the message lists the known ones) or unknown/invalid params.
    """
    if name not in REWARD_NAMES:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARD_NAMES)}")
    return _factories()[name](**params)


__all__ = [
    "REWARD_NAMES",
    "Normalizer",
    "RewardModel",
    "check_batch",
    "fit_normalizer",
    "get_reward",
]
