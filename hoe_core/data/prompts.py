"""Prompt sets for building and evaluating the helpful / harmless / humor model.

Four sources, each record tagged with a category:

    chatterbot  questions from chatterbot-corpus (first turn of each conversation), cleaned  -> helpful
    assistant   hand-written everyday requests (advice, explain, howto, writing, planning)    -> helpful
    joke        templates x everyday topics, plus open-ended humor prompts                   -> humor
    redteam     hand-written requests to refuse or redirect (insult, revenge, cheating, ...) -> harmless

The hand-written lists live in ``assets/prompts/source/*.yaml``, not in this file.

    source/*.yaml + corpus ──clean, drop near-duplicates──► pool
    pool  ──stratified by (source, category), whole joke topics──► eval (25%) | train
    train ──the same, 15%──► val      (val ⊂ train; eval is disjoint from both)

Every choice is a seeded hash, so the same seed writes the same files byte for byte:
``python -m hoe_core.data.prompts --out assets/prompts --seed 0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.resources
import json
import math
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hoe_core.config import MAX_PROMPT_CHARS, from_dict

SOURCES: tuple[str, ...] = ("chatterbot", "joke", "redteam", "assistant")
SPLITS: tuple[str, ...] = ("train", "eval", "val")
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "assets" / "prompts"
EVAL_FRACTION = 0.25  # of the pool, per (source, category)
VAL_FRACTION = 0.15  # of train, per (source, category)
NEAR_DUPLICATE = 0.8  # Jaccard similarity of normalised word sets at or above which two prompts are one

_ARTICLES = frozenset({"a", "an", "the"})
_STRAIGHTEN = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-", "…": "..."})
_REQUEST_WORDS = frozenset({"tell", "explain", "write", "make", "build", "name"})


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: ``id`` is stable (source, category and a hash of the text)."""

    id: str
    prompt: str
    source: str
    category: str

    def __post_init__(self) -> None:
        if not self.id or not self.category:
            raise ValueError(f"prompt record needs an id and a category, got {self!r}")
        if self.source not in SOURCES:
            raise ValueError(f"{self.id}: source must be one of {SOURCES}, got {self.source!r}")
        if not self.prompt.strip() or self.prompt != self.prompt.strip():
            raise ValueError(f"{self.id}: prompt must be non-empty and stripped, got {self.prompt!r}")
        if any(not c.isprintable() for c in self.prompt):  # newlines would break eval.txt
            raise ValueError(f"{self.id}: prompt has a newline or control character: {self.prompt!r}")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"{self.id}: prompt longer than {MAX_PROMPT_CHARS} characters")


@dataclass(frozen=True)
class CorpusConfig:
    """How chatterbot-corpus lines become prompts (``source/chatterbot.yaml``)."""

    categories: dict[str, int] = field(metadata={"help": "corpus file stem -> at most this many prompts"})
    question_starts: list[str] = field(metadata={"help": "first words that make a line a question/request"})
    statement_categories: list[str] = field(
        default_factory=list, metadata={"help": "categories kept even when not a question"}
    )
    min_words: int = field(default=3, metadata={"help": "shorter lines are dropped"})
    max_chars: int = field(default=200, metadata={"help": "longer lines are dropped"})
    fixes: dict[str, str] = field(default_factory=dict, metadata={"help": "exact replacements (typos)"})
    drop: list[str] = field(default_factory=list, metadata={"help": "lines dropped by hand (fragments)"})


@dataclass(frozen=True)
class PoolItem:
    """A record in the pool before splitting, with the group it must travel with."""

    record: PromptRecord
    group: str  # items of one group always share a split (a joke topic)


def normalize_prompt(text: str) -> str:
    """Case, whitespace, punctuation and articles folded away: the key for "same prompt"."""
    words = re.sub(r"[^a-z0-9]+", " ", text.translate(_STRAIGHTEN).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the normalised word sets of two prompts, in [0, 1]."""
    sa, sb = set(normalize_prompt(a).split()), set(normalize_prompt(b).split())
    return len(sa & sb) / max(len(sa | sb), 1)


def _rank(seed: int, *parts: str) -> str:
    """A seeded, platform-independent sort key (adding a prompt never reshuffles the others)."""
    return hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).hexdigest()


def _record(source: str, category: str, prompt: str) -> PromptRecord:
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:8]
    return PromptRecord(f"{source}-{category}-{digest}", prompt, source, category)


def _load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def tidy_corpus_line(raw: object) -> str:
    """Quotes straightened, whitespace collapsed, SHOUTING lowered, capitalised, "is is" -> "is".

    The keys of ``fixes`` and ``drop`` in ``chatterbot.yaml`` are lines at this stage.
    """
    text = " ".join(str(raw).translate(_STRAIGHTEN).split())
    letters = [c for c in text if c.isalpha()]
    if letters and sum(c.isupper() for c in letters) > 0.7 * len(letters):  # SHOUTED lines (sports)
        text = text.lower()
    return re.sub(r"\b(\w+) \1\b", r"\1", text[:1].upper() + text[1:], flags=re.IGNORECASE)


def clean_corpus_line(raw: object, cfg: CorpusConfig, statements_ok: bool = False) -> str | None:
    """One corpus line -> a prompt, or None when it is a fragment, too short/long or not a question."""
    text = tidy_corpus_line(raw)
    text = cfg.fixes.get(text, text)
    words = text.split()
    if not words or text in cfg.drop or len(words) < cfg.min_words or len(text) > cfg.max_chars:
        return None
    first = words[0].lower().strip("'\",")
    if not (text.endswith("?") or first in cfg.question_starts or statements_ok):
        return None
    if text[-1] not in ".?!'\"":
        text += "." if first in _REQUEST_WORDS or statements_ok else "?"
    return text


def corpus_questions(cfg: CorpusConfig, corpus_dir: Path | None = None) -> dict[str, list[str]]:
    """Category -> cleaned, unique first turns of chatterbot-corpus conversations, in corpus order."""
    if corpus_dir is None:
        corpus_dir = Path(str(importlib.resources.files("chatterbot_corpus") / "data" / "english"))
    out: dict[str, list[str]] = {}
    for category in cfg.categories:
        path = corpus_dir / f"{category}.yml"
        if not path.is_file():
            raise FileNotFoundError(f"chatterbot-corpus has no category {category!r} ({path})")
        conversations = _load_yaml(path).get("conversations") or []
        ok = category in cfg.statement_categories
        lines = (clean_corpus_line(c[0], cfg, ok) for c in conversations if c)
        out[category] = list(dict.fromkeys(t for t in lines if t))
    return out


class _Pool:
    """Items kept so far; refuses exact and near-duplicates of items in other groups."""

    def __init__(self) -> None:
        self.items: list[PoolItem] = []
        self._sets: list[set[str]] = []
        self.dropped = 0

    def clash(self, prompt: str, group: str) -> str | None:
        words = set(normalize_prompt(prompt).split())
        for item, other in zip(self.items, self._sets, strict=True):
            jaccard = len(words & other) / max(len(words | other), 1)
            # near-duplicates inside one group are fine (they share a split); exact ones never are
            if jaccard >= NEAR_DUPLICATE and (item.group != group or jaccard == 1.0):
                return item.record.prompt
        return None

    def add(self, item: PoolItem, strict: bool) -> bool:
        other = self.clash(item.record.prompt, item.group)
        if other is not None:
            if strict:  # a hand-written list must not repeat itself
                raise ValueError(f"duplicate prompt {item.record.prompt!r} ~ {other!r}; edit the source YAML")
            self.dropped += 1
            return False
        self.items.append(item)
        self._sets.append(set(normalize_prompt(item.record.prompt).split()))
        return True


def collect_prompts(
    source_dir: Path, seed: int = 0, corpus_dir: Path | None = None
) -> tuple[list[PoolItem], int]:
    """Every prompt of the four sources, deduplicated. Returns (items, corpus lines dropped as duplicates)."""
    pool = _Pool()
    for source, name in (("redteam", "redteam.yaml"), ("assistant", "assistant.yaml")):
        for category, prompts in _load_yaml(source_dir / name).items():
            for prompt in prompts:
                rec = _record(source, category, prompt)
                pool.add(PoolItem(rec, rec.id), strict=True)

    jokes = _load_yaml(source_dir / "jokes.yaml")
    for category, topics in jokes["topics"].items():
        for topic in topics:
            picks = sorted(jokes["templates"], key=lambda t, topic=topic: _rank(seed, "joke", topic, t))
            for template in picks[: jokes["templates_per_topic"]]:
                rec = _record("joke", category, template.format(topic=topic))
                pool.add(PoolItem(rec, f"topic:{topic}"), strict=True)
    for prompt in jokes["open_ended"]:
        rec = _record("joke", "open", prompt)
        pool.add(PoolItem(rec, rec.id), strict=True)

    cfg = from_dict(CorpusConfig, _load_yaml(source_dir / "chatterbot.yaml"))
    for category, lines in corpus_questions(cfg, corpus_dir).items():
        kept = 0
        for line in sorted(lines, key=lambda t, c=category: _rank(seed, "chatterbot", c, t)):
            if kept == cfg.categories[category]:
                break
            rec = _record("chatterbot", category, line)
            kept += pool.add(PoolItem(rec, rec.id), strict=False)
    return pool.items, pool.dropped


def _apportion(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over keys in proportion to ``sizes`` (largest remainders; exact sum)."""
    n = sum(sizes.values())
    exact = {k: total * v / n for k, v in sizes.items()}
    quota = {k: math.floor(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[: total - sum(quota.values())]:
        quota[k] += 1
    return quota


def stratified_pick(items: list[PoolItem], fraction: float, seed: int, salt: str) -> set[str]:
    """Ids of about ``fraction`` of the items of every source, spread over its categories by size.

    Whole groups are taken (a joke topic's prompts stay together), in seeded-hash order.
    """
    picked: set[str] = set()
    for source in SOURCES:
        by_cat: dict[str, dict[str, list[PoolItem]]] = {}
        for it in items:
            if it.record.source == source:
                by_cat.setdefault(it.record.category, {}).setdefault(it.group, []).append(it)
        sizes = {c: sum(map(len, groups.values())) for c, groups in by_cat.items()}
        if not sizes:
            continue
        quotas = _apportion(sizes, math.floor(sum(sizes.values()) * fraction + 0.5))
        carry = 0  # what whole groups made a category miss, owed by the next one
        for category in sorted(by_cat):
            groups, quota, taken = by_cat[category], quotas[category] + carry, 0
            for g in sorted(groups, key=lambda g: _rank(seed, salt, g)):
                if abs(taken + len(groups[g]) - quota) < abs(taken - quota):
                    taken += len(groups[g])
                    picked.update(it.record.id for it in groups[g])
            carry = quota - taken
    return picked


def _counts(records: list[PromptRecord]) -> dict:
    return {
        "total": len(records),
        "by_source": dict(Counter(r.source for r in records)),
        "by_category": dict(sorted(Counter(f"{r.source}/{r.category}" for r in records).items())),
    }


def _order(records: list[PromptRecord]) -> list[PromptRecord]:
    return sorted(records, key=lambda r: (SOURCES.index(r.source), r.category, r.id))


def _write(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)


def _counts_table(counts: dict) -> str:
    keys = sorted({k for split in SPLITS for k in counts[split]["by_category"]})
    rows = ["| source/category | train | eval | val |", "|---|---:|---:|---:|"]
    for k in keys:
        rows.append(f"| {k} | " + " | ".join(str(counts[s]["by_category"].get(k, 0)) for s in SPLITS) + " |")
    for source in SOURCES:
        rows.append(
            f"| **{source}** | " + " | ".join(str(counts[s]["by_source"][source]) for s in SPLITS) + " |"
        )
    rows.append("| **total** | " + " | ".join(str(counts[s]["total"]) for s in SPLITS) + " |")
    return "\n".join(rows)


def build_prompt_splits(out_dir: Path, seed: int = 0, source_dir: Path | None = None) -> dict:
    """Write train/eval/val (``.jsonl`` and one-prompt-per-line ``.txt``) and README.md.

    Args:
        out_dir: folder to write into (created if missing).
        seed: the seed of every sample, template choice and split.
        source_dir: the hand-written YAML files; default ``assets/prompts/source``.

    Returns:
        ``{"train" | "eval" | "val": {"total", "by_source", "by_category"}, "seed", "dropped_duplicates"}``.
    """
    source_dir = Path(source_dir) if source_dir is not None else DEFAULT_ROOT / "source"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items, dropped = collect_prompts(source_dir, seed)
    eval_ids = stratified_pick(items, EVAL_FRACTION, seed, "eval")
    train_items = [it for it in items if it.record.id not in eval_ids]
    val_ids = stratified_pick(train_items, VAL_FRACTION, seed, "val")
    splits = {
        "train": _order([it.record for it in train_items]),
        "eval": _order([it.record for it in items if it.record.id in eval_ids]),
        "val": _order([it.record for it in train_items if it.record.id in val_ids]),
    }
    for name, records in splits.items():
        _write(
            out_dir / f"{name}.jsonl",
            [json.dumps(dataclasses.asdict(r), ensure_ascii=False) for r in records],
        )
        _write(out_dir / f"{name}.txt", [r.prompt for r in records])
    counts = {name: _counts(records) for name, records in splits.items()}
    counts |= {"seed": seed, "dropped_duplicates": dropped}
    template = string.Template((source_dir / "README.template.md").read_text(encoding="utf-8"))
    readme = template.substitute(
        counts=_counts_table(counts),
        seed=seed,
        corpus_version=importlib.metadata.version("chatterbot-corpus"),
        dropped=dropped,
        eval_pct=round(100 * EVAL_FRACTION),
        val_pct=round(100 * VAL_FRACTION),
        near=NEAR_DUPLICATE,
    )
    _write(out_dir / "README.md", readme.rstrip("\n").split("\n"))
    return counts


def load_prompts(split: str, root: Path = DEFAULT_ROOT) -> list[PromptRecord]:
    """The records of one split: ``"train"``, ``"eval"`` or ``"val"`` (a subset of train)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(root) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `python -m hoe_core.data.prompts --out {root}`")
    with open(path, encoding="utf-8") as f:
        return [PromptRecord(**json.loads(line)) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hoe_core.data.prompts", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every sample and split")
    parser.add_argument("--source", type=Path, default=None, help="folder of the hand-written YAML files")
    args = parser.parse_args(argv)
    counts = build_prompt_splits(args.out, seed=args.seed, source_dir=args.source)
    print(json.dumps({s: counts[s]["by_source"] | {"total": counts[s]["total"]} for s in SPLITS}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
