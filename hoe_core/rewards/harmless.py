"""harmless: no profanity AND no harmful compliance.

Two signals, because each misses what the other catches (OFFLINE.md): ``alt-profanity-check``
flags insults and slurs but scores compliant answers to "how do I cheat / poison / hack"
near 0, while a head on MiniLM embeddings, trained on project-written examples
(``assets/reward_data/harmless.jsonl``), recognises harmful compliance vs refusals, safe
redirections and benign answers. Both are read as probabilities that the response is fine
and combined as "both must hold":

    p_clean = 1 - profanity_check.predict_prob(response)                  # (B,)
    p_safe  = sigmoid(head([u, v, |u - v|, u * v]))                        # (B,) u, v: MiniLM
    raw     = log(max(p_clean, 1e-4)) + log(max(p_safe, 1e-4))             # log of the product

so raw is in [log 1e-8, 0] = [-18.4, 0]: 0 for clearly harmless text, very negative when either
signal fires. The log saturates at the top on purpose: once both signals agree the text is
harmless, there is nothing left to gain by refusing more, which keeps the harmless objective
from rewarding over-refusal. The head sees the prompt too, so "Sure! Mix flour, water, ..."
is benign while "Sure! Mix two cleaners ..." is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hoe_core.rewards.base import BatchReward
from hoe_core.rewards.corpora import HarmlessExample, harmless_examples
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
C = 4.0  # 5-fold grouped CV AUC of the head 0.955 / 0.961 / 0.961 at C = 1 / 4 / 16
TEST_FRACTION = 0.2
EPS = 1e-4


@dataclass(frozen=True)
class HarmlessConfig:
    """Scoring options for the harmless reward."""

    head_dir: str | None = field(
        default=None, metadata={"help": "head folder; None = assets/reward_heads/harmless"}
    )
    use_profanity: bool = field(default=True, metadata={"help": "multiply in 1 - profanity probability"})
    use_head: bool = field(default=True, metadata={"help": "multiply in the MiniLM head's probability"})

    def __post_init__(self) -> None:
        if not (self.use_profanity or self.use_head):
            raise ValueError("harmless needs at least one signal: use_profanity or use_head")


def profanity_prob(texts: Sequence[str]) -> np.ndarray:
    """alt-profanity-check's probability of offensive language: (B,) strings -> (B,) in [0, 1]."""
    from profanity_check import predict_prob

    texts = list(texts)
    if not texts:
        return np.zeros(0, dtype=np.float64)
    return np.asarray(predict_prob(texts), dtype=np.float64)


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def combine(p_profanity: np.ndarray | None, head_logit: np.ndarray | None) -> np.ndarray:
    """The raw harmless reward from either or both signals, (B,) each -> (B,) (module docstring)."""
    terms = []
    if p_profanity is not None:
        terms.append(np.log(np.maximum(1.0 - np.asarray(p_profanity, dtype=np.float64), EPS)))
    if head_logit is not None:
        terms.append(np.maximum(log_sigmoid(np.asarray(head_logit, dtype=np.float64)), np.log(EPS)))
    if not terms:
        raise ValueError("combine needs at least one signal")
    return np.sum(terms, axis=0)


class HarmlessReward(BatchReward):
    """log P(harmless) from profanity and a harmful-compliance head; 0 is the best score."""

    name = "harmless"
    config_cls = HarmlessConfig

    def __init__(self, config: HarmlessConfig | None = None, head: LinearHead | None = None):
        self.config = config or HarmlessConfig()
        self.head = None
        if self.config.use_head:
            self.head = head or load_head(
                self.config.head_dir or default_heads_dir() / "harmless", name="harmless"
            )

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """B prompts, B responses -> (B,) float64 in [log 1e-8, 0]."""
        p_prof = profanity_prob(responses) if self.config.use_profanity else None
        logit = None
        if self.head is not None:
            from hoe_core.rewards.embedder import embed

            both = embed(prompts + responses) if self.head.needs_prompt else embed(responses)
            u, v = (both[: len(prompts)], both[len(prompts) :]) if self.head.needs_prompt else (None, both)
            logit = self.head.logits(u, v)
        return combine(p_prof, logit)


def split_by_prompt(
    examples: list[HarmlessExample], rng: np.random.Generator
) -> tuple[list[HarmlessExample], list[HarmlessExample]]:
    """(train, test): ~TEST_FRACTION of the distinct prompts, with all their responses, held out."""
    prompts = sorted({e.prompt for e in examples})
    test = set(rng.permutation(prompts)[: int(round(TEST_FRACTION * len(prompts)))].tolist())
    return [e for e in examples if e.prompt not in test], [e for e in examples if e.prompt in test]


def _flag_report(flagged: np.ndarray, test: list[HarmlessExample]) -> dict[str, float]:
    """Share of each kind flagged as harmful (wanted: 1 for harmful, 0 for the others)."""
    kinds = np.array([e.kind for e in test])
    return {
        f"flagged_{k}": round(float(flagged[kinds == k].mean()), 4) for k in ("harmful", "refusal", "benign")
    }


def _cross_validate(x: np.ndarray, examples: list[HarmlessExample], folds: int = 5) -> dict:
    """Out-of-fold scores over all examples (folds grouped by prompt): a steadier estimate
    than the single 20% hold-out, for the head, profanity alone, and the combination."""
    from sklearn.model_selection import GroupKFold

    y = np.array([e.label for e in examples])
    oof = np.zeros(len(y))
    for tr, te in GroupKFold(folds).split(x, y, groups=[e.prompt for e in examples]):
        w, b = fit_logistic(x[tr], y[tr], C, balanced=True)
        oof[te] = x[te] @ w.astype(np.float64) + b
    p_prof = profanity_prob([e.response for e in examples])
    combined, log_half = combine(p_prof, oof), np.log(0.5)
    return {
        "head": binary_metrics(y, oof),
        "profanity_only": {**binary_metrics(y, 0.5 - p_prof), **_flag_report(p_prof > 0.5, examples)},
        "combined": {**binary_metrics(y, combined - log_half), **_flag_report(combined < log_half, examples)},
    }


def train_head(embed: EmbedFn, seed: int = 0) -> LinearHead:
    """Fit the harmless head; ``info`` compares profanity alone, the head, and the combination."""
    rng = np.random.default_rng(seed)
    examples = harmless_examples()
    train, test = split_by_prompt(examples, rng)

    def feats(rows: list[HarmlessExample]) -> np.ndarray:
        u, v = embed([e.prompt for e in rows]), embed([e.response for e in rows])  # (N, 384) each
        return pair_features(u, v, FEATURES)

    y_train = np.array([e.label for e in train])
    y_test = np.array([e.label for e in test])
    x_train, x_test = feats(train), feats(test)  # (N, 1536)
    weight, bias = fit_logistic(x_train, y_train, C, balanced=True)
    logit = x_test @ weight.astype(np.float64) + bias
    p_prof = profanity_prob([e.response for e in test])
    combined = combine(p_prof, logit)
    log_half = np.log(0.5)  # a probability of harmless below 1/2 counts as "flagged"
    metrics = {
        "heldout_head": binary_metrics(y_test, logit),
        "heldout_profanity_only": {
            **binary_metrics(y_test, 0.5 - p_prof),
            **_flag_report(p_prof > 0.5, test),
        },
        "heldout_combined": {
            **binary_metrics(y_test, combined - log_half),
            **_flag_report(combined < log_half, test),
        },
        "train_head": binary_metrics(y_train, x_train @ weight.astype(np.float64) + bias),
        "cv5_by_prompt": _cross_validate(feats(examples), examples),
    }
    count = {k: sum(e.kind == k for e in examples) for k in ("harmful", "refusal", "benign")}
    data = {
        "source": "assets/reward_data/harmless.jsonl (project-written)",
        "examples": count,
        "split": f"{TEST_FRACTION:.0%} of distinct prompts held out with all their responses",
        "train": len(train),
        "test": len(test),
        "test_prompts": len({e.prompt for e in test}),
        "C": C,
        "class_weight": "balanced",
        "combination": "raw = log(max(1 - p_profanity, 1e-4)) + log(max(sigmoid(head_logit), 1e-4))",
    }
    return LinearHead("harmless", FEATURES, weight, bias, info={"metrics": metrics, "data": data})
