"""Lexical rewards on the response text alone: positive, concise, simple.

    positive = VADER compound(response)                      in [-1, 1]
    concise  = -log(1 + words / ref_words)                   in (-inf, 0], 0 for an empty reply
    simple   = Flesch reading ease(response), clipped         in [clip_min, clip_max]

concise is strictly decreasing in the word count: roughly linear (-words/ref_words) below
``ref_words`` and logarithmic above, so every extra word costs something but a rambling
reply never dominates the other objectives' scale. It prefers an empty reply; pair it with
helpful. simple uses textstat's word and sentence counts and its pyphen syllable counter
(textstat's own ``flesch_reading_ease`` first tries NLTK's cmudict, which it downloads —
impossible offline), with textstat's language constants:

    FRE = base - sentence_length * words / sentences - syll_per_word * syllables / words
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import numpy as np

from hoe_core.rewards.base import BatchReward


def _empty(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.float64)


# --- positive -------------------------------------------------------------------------


@dataclass(frozen=True)
class PositiveConfig:
    """VADER has no options worth exposing; kept for a uniform ``get_reward(name, **params)``."""


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()  # reads the lexicon bundled in the package


class PositiveReward(BatchReward):
    """Sentiment of the response: VADER compound in [-1, 1]."""

    name = "positive"
    config_cls = PositiveConfig

    def __init__(self, config: PositiveConfig | None = None):
        self.config = config or PositiveConfig()

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """B prompts (unused), B responses -> (B,) float64 in [-1, 1]."""
        analyzer = _vader()
        return np.array([analyzer.polarity_scores(r)["compound"] for r in responses], dtype=np.float64)


# --- concise --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConciseConfig:
    """Length penalty ``-log(1 + words / ref_words)``."""

    ref_words: float = field(
        default=20.0, metadata={"help": "length scale: the penalty is log 2 = 0.69 at this many words"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.ref_words, (int, float)) or not self.ref_words > 0:
            raise ValueError(f"ref_words must be a positive number, got {self.ref_words!r}")


def word_count(text: str) -> int:
    """Whitespace-separated tokens that contain a letter or digit."""
    return sum(1 for tok in text.split() if re.search(r"\w", tok))


class ConciseReward(BatchReward):
    """Shorter is better: -log(1 + words / ref_words)."""

    name = "concise"
    config_cls = ConciseConfig

    def __init__(self, config: ConciseConfig | None = None):
        self.config = config or ConciseConfig()

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """B prompts (unused), B responses -> (B,) float64 <= 0."""
        words = np.array([word_count(r) for r in responses], dtype=np.float64)
        return 0.0 - np.log1p(words / self.config.ref_words) if len(words) else _empty(0)


# --- simple ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SimpleConfig:
    """Flesch reading ease with pyphen syllables."""

    lang: str = field(default="en_US", metadata={"help": "pyphen dictionary and textstat constants"})
    clip_min: float = field(default=-100.0, metadata={"help": "floor: one 30-syllable token is not -2000"})
    clip_max: float = field(default=121.22, metadata={"help": "the formula's maximum (one 1-syllable word)"})
    empty_score: float = field(default=0.0, metadata={"help": "score of a reply with no words"})

    def __post_init__(self) -> None:
        if not self.clip_min < self.clip_max:
            raise ValueError(f"clip_min must be < clip_max, got {self.clip_min} >= {self.clip_max}")


@functools.lru_cache(maxsize=8)
def _pyphen(lang: str):
    import pyphen

    if not pyphen.language_fallback(lang):
        raise ValueError(f"pyphen has no hyphenation dictionary for lang {lang!r}")
    return pyphen.Pyphen(lang=lang)


def flesch_reading_ease(text: str, lang: str = "en_US") -> float | None:
    """Flesch reading ease of ``text`` with pyphen syllables; None if it has no words.

    Same counts as textstat's ``flesch_reading_ease`` when cmudict is unavailable, but never
    calls NLTK (so never tries to download anything).
    """
    from textstat.backend import counts, selections, utils

    words = counts.count_words(text)
    if words == 0:
        return None
    sentences = counts.count_sentences(text)
    dic = _pyphen(lang)
    syllables = sum(len(dic.positions(w)) + 1 for w in selections.list_words(text, lowercase=True))
    root = utils.get_lang_root(lang)
    return (
        utils.get_lang_cfg(root, "fre_base")
        - utils.get_lang_cfg(root, "fre_sentence_length") * words / sentences
        - utils.get_lang_cfg(root, "fre_syll_per_word") * syllables / words
    )


class SimpleReward(BatchReward):
    """Readability of the response: Flesch reading ease (higher = simpler)."""

    name = "simple"
    config_cls = SimpleConfig

    def __init__(self, config: SimpleConfig | None = None):
        self.config = config or SimpleConfig()
        _pyphen(self.config.lang)  # fail now on an unknown language, not mid-training

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """B prompts (unused), B responses -> (B,) float64 in [clip_min, clip_max]."""
        cfg = self.config
        raw = [flesch_reading_ease(r, cfg.lang) for r in responses]
        out = np.array([cfg.empty_score if s is None else s for s in raw], dtype=np.float64)
        return np.clip(out, cfg.clip_min, cfg.clip_max)
