"""helpful: does the response answer the prompt? A pair head on MiniLM embeddings.

    u = MiniLM(prompt), v = MiniLM(response)                  # (B, 384) each, unit norm
    raw = [u, v, |u - v|, u * v] @ w + b                       # (B,) log-odds "answers it"
    raw = min(raw, empty_score) where the response has < min_chars letters/digits

Training data: chatterbot-corpus question -> answer turns (positives) against mismatched
answers (negatives), half drawn from any other conversation and half from the *same*
category (so topic alone does not give the answer away), plus near-empty replies ("", "ok",
"...") as negatives. The held-out 20% is split by conversation group (conversations sharing
a question are one group), and its negatives are drawn from held-out answers only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from hoe_core.rewards.base import BatchReward
from hoe_core.rewards.corpora import Turn, chatterbot_turns
from hoe_core.rewards.heads import (
    EmbedFn,
    LinearHead,
    binary_metrics,
    default_heads_dir,
    fit_logistic,
    load_head,
    pair_features,
)

FEATURES = ("u", "v", "absdiff", "prod")
NEAR_EMPTY = ("", ".", "...", "?", "ok", "hmm", "um", "lol", "k", "-")
C = 1.0  # inverse L2 strength; held-out AUC 0.888 / 0.888 / 0.873 at C = 0.25 / 1 / 4
EMPTY_FRACTION = 0.1  # near-empty negatives per positive
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class HelpfulConfig:
    """Scoring options for the helpful reward."""

    head_dir: str | None = field(
        default=None, metadata={"help": "head folder; None = assets/reward_heads/helpful"}
    )
    min_chars: int = field(default=2, metadata={"help": "responses with fewer letters/digits count as empty"})
    empty_score: float = field(
        default=-8.0, metadata={"help": "the raw score an empty response gets at most"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.min_chars, int) or self.min_chars < 0:
            raise ValueError(f"min_chars must be a non-negative integer, got {self.min_chars!r}")
        if not np.isfinite(self.empty_score):
            raise ValueError(f"empty_score must be finite, got {self.empty_score!r}")


class HelpfulReward(BatchReward):
    """Relevance of a response to its prompt, as log-odds (higher = more on point)."""

    name = "helpful"
    config_cls = HelpfulConfig

    def __init__(self, config: HelpfulConfig | None = None, head: LinearHead | None = None):
        self.config = config or HelpfulConfig()
        path = self.config.head_dir or default_heads_dir() / "helpful"
        self.head = head or load_head(path, name="helpful")

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """B prompts, B responses -> (B,) float64 log-odds."""
        from hoe_core.rewards.embedder import embed

        both = embed(prompts + responses)  # one call: shared batching and dedupe, (2B, 384)
        u, v = both[: len(prompts)], both[len(prompts) :]
        raw = self.head.logits(u, v)
        empty = np.array([_content_chars(r) < self.config.min_chars for r in responses])
        return np.where(empty, np.minimum(raw, self.config.empty_score), raw)


def _content_chars(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


@dataclass(frozen=True)
class PairData:
    prompts: list[str]
    responses: list[str]
    labels: np.ndarray  # (N,) 1 = the response answers the prompt
    kinds: list[str]  # "match" | "random" | "same_category" | "empty"


def _negatives(turns: list[Turn], rng: np.random.Generator) -> PairData:
    """Every turn as a positive, one mismatched answer each, and some near-empty replies."""
    answers_of: dict[str, set[str]] = {}
    for t in turns:
        answers_of.setdefault(t.prompt, set()).add(t.response)
    by_category: dict[str, list[int]] = {}
    for i, t in enumerate(turns):
        by_category.setdefault(t.category, []).append(i)
    prompts, responses, labels, kinds = [], [], [], []
    for i, t in enumerate(turns):
        prompts.append(t.prompt), responses.append(t.response), labels.append(1), kinds.append("match")
        same = i % 2 == 1
        pool = by_category[t.category] if same else range(len(turns))
        candidates = [
            j for j in pool if turns[j].group != t.group and turns[j].response not in answers_of[t.prompt]
        ]
        if not candidates:  # a category with a single group: fall back to any answer
            same, candidates = False, [j for j in range(len(turns)) if turns[j].group != t.group]
        j = candidates[int(rng.integers(len(candidates)))]
        prompts.append(t.prompt), responses.append(turns[j].response), labels.append(0)
        kinds.append("same_category" if same else "random")
        if rng.random() < EMPTY_FRACTION:
            prompts.append(t.prompt), responses.append(NEAR_EMPTY[int(rng.integers(len(NEAR_EMPTY)))])
            labels.append(0), kinds.append("empty")
    return PairData(prompts, responses, np.array(labels), kinds)


def split_turns(turns: list[Turn], rng: np.random.Generator) -> tuple[list[Turn], list[Turn]]:
    """(train, test) with ~TEST_FRACTION of the conversation groups held out."""
    groups = np.array(sorted({t.group for t in turns}))
    test_groups = set(rng.permutation(groups)[: int(round(TEST_FRACTION * len(groups)))].tolist())
    return [t for t in turns if t.group not in test_groups], [t for t in turns if t.group in test_groups]


def train_head(embed: EmbedFn, seed: int = 0) -> LinearHead:
    """Fit the helpful head; ``info`` carries held-out metrics and data sizes."""
    rng = np.random.default_rng(seed)
    train_turns, test_turns = split_turns(chatterbot_turns(), rng)
    train, test = _negatives(train_turns, rng), _negatives(test_turns, rng)

    def feats(d: PairData) -> tuple[np.ndarray, np.ndarray]:
        return embed(d.prompts), embed(d.responses)  # (N, 384) each

    weight, bias = fit_logistic(pair_features(*feats(train), FEATURES), train.labels, C)
    head = LinearHead("helpful", FEATURES, weight, bias)
    u, v = feats(test)
    logit = head.logits(u, v)
    kinds = np.array(test.kinds)
    metrics = {
        "heldout": binary_metrics(test.labels, logit),
        "heldout_cosine_baseline_auc": binary_metrics(test.labels, (u * v).sum(1))["auc"],
    }
    for kind in ("random", "same_category", "empty"):
        keep = (kinds == "match") | (kinds == kind)
        metrics[f"heldout_match_vs_{kind}"] = binary_metrics(test.labels[keep], logit[keep])
    metrics["train"] = binary_metrics(train.labels, head.logits(*feats(train)))
    data = {
        "source": "chatterbot-corpus english (consecutive turns, deduplicated)",
        "split": f"{TEST_FRACTION:.0%} of conversation groups held out (groups merge conversations sharing a prompt)",
        "train_groups": len({t.group for t in train_turns}),
        "test_groups": len({t.group for t in test_turns}),
        "train_pairs": _count(train),
        "test_pairs": _count(test),
        "C": C,
    }
    return dataclasses.replace(head, info={"metrics": metrics, "data": data})


def _count(d: PairData) -> dict[str, int]:
    return {k: d.kinds.count(k) for k in ("match", "random", "same_category", "empty")}
