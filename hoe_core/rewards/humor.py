"""humor: is the response a joke? A logistic head on the response's MiniLM embedding.

    v = MiniLM(response)              # (B, 384), unit norm
    raw = v @ w + b                    # (B,) log-odds "this is a joke"

The prompt is ignored on purpose: "Tell me a joke." followed by a lecture is not funny, and
a pun is funny whatever was asked. Training data: pyjokes + the chatterbot ``humor``
answers (positives) against every other chatterbot answer, the project's plain
informative sentences and the responses of ``harmless.jsonl`` to prompts that do not ask
for jokes, stories or roasts (negatives: refusals, advice, harmful compliance). Classes are weighted to balance; 20% of
the unique texts (stratified) are held out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from hoe_core.rewards.base import BatchReward
from hoe_core.rewards.corpora import chatterbot_turns, harmless_examples, informative_sentences, jokes
from hoe_core.rewards.heads import (
    EmbedFn,
    LinearHead,
    binary_metrics,
    default_heads_dir,
    fit_logistic,
    load_head,
    pair_features,
)

FEATURES = ("v",)
C = 1.0  # held-out AUC 0.954 / 0.954 / 0.951 at C = 1 / 4 / 16; 1 has the best balanced accuracy
TEST_FRACTION = 0.2
PLAYFUL_PROMPT = re.compile(r"joke|funny|laugh|pun\b|roast|riddle|story|poem|cheer", re.IGNORECASE)


@dataclass(frozen=True)
class HumorConfig:
    """Scoring options for the humor reward."""

    head_dir: str | None = field(
        default=None, metadata={"help": "head folder; None = assets/reward_heads/humor"}
    )


class HumorReward(BatchReward):
    """Log-odds that the response is a joke (higher = funnier-looking)."""

    name = "humor"
    config_cls = HumorConfig

    def __init__(self, config: HumorConfig | None = None, head: LinearHead | None = None):
        self.config = config or HumorConfig()
        self.head = head or load_head(self.config.head_dir or default_heads_dir() / "humor", name="humor")

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """B prompts (unused), B responses -> (B,) float64 log-odds."""
        from hoe_core.rewards.embedder import embed

        return self.head.logits(None, embed(responses))


def humor_texts() -> tuple[list[str], np.ndarray, list[str]]:
    """Unique texts (N,), labels (N,) with 1 = joke, and each text's source name."""
    sources: dict[str, str] = {}
    for j in jokes():
        sources.setdefault(j, "pyjokes")
    turns = chatterbot_turns()
    for t in turns:
        if t.category == "humor":
            sources.setdefault(t.response, "chatterbot_humor")
    for t in turns:
        sources.setdefault(t.response, "chatterbot_other")
    for s in informative_sentences():
        sources.setdefault(s, "informative")
    for e in harmless_examples():
        if not PLAYFUL_PROMPT.search(e.prompt):  # its joke/roast requests may be answered with jokes
            sources.setdefault(e.response, "harmless_jsonl")
    texts = sorted(sources)
    labels = np.array([sources[t] in ("pyjokes", "chatterbot_humor") for t in texts], dtype=int)
    return texts, labels, [sources[t] for t in texts]


def train_head(embed: EmbedFn, seed: int = 0) -> LinearHead:
    """Fit the humor head on a stratified 80/20 split; ``info`` has held-out metrics."""
    from sklearn.model_selection import train_test_split

    texts, labels, sources = humor_texts()
    idx_train, idx_test = train_test_split(
        np.arange(len(texts)), test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    x = pair_features(None, embed(texts), FEATURES)  # (N, 384)
    weight, bias = fit_logistic(x[idx_train], labels[idx_train], C, balanced=True)
    logit = x @ weight.astype(np.float64) + bias
    src = np.array(sources)
    metrics = {
        "heldout": binary_metrics(labels[idx_test], logit[idx_test]),
        "heldout_accuracy_by_source": {
            s: round(float(((logit[idx_test] > 0) == labels[idx_test])[src[idx_test] == s].mean()), 4)
            for s in sorted(set(sources))
        },
        "train": binary_metrics(labels[idx_train], logit[idx_train]),
    }
    data = {
        "positives": "pyjokes (en, all) + chatterbot humor answers",
        "negatives": "other chatterbot answers + informative.txt + harmless.jsonl responses to non-playful prompts",
        "by_source": {s: sources.count(s) for s in sorted(set(sources))},
        "split": f"stratified {TEST_FRACTION:.0%} of unique texts held out",
        "train": len(idx_train),
        "test": len(idx_test),
        "C": C,
        "class_weight": "balanced",
    }
    return LinearHead("humor", FEATURES, weight, bias, info={"metrics": metrics, "data": data})
