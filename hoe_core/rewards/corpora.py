"""Training text for the reward heads, all of it shipped in packages or in this repo.

- ``chatterbot-corpus``: ~1,250 unique question -> answer turns in 21 categories (YAML).
- ``pyjokes``: 283 one-line (programmer) jokes.
- ``assets/reward_data/harmless.jsonl``: project-written refusals, safe redirections and
  benign answers (label 1) vs harmful compliance (label 0), one JSON object per line.
- ``assets/reward_data/informative.txt``: project-written plain factual sentences.
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

#: Project-written training data (see the module docstring).
DATA_DIR = Path(__file__).resolve().parents[2] / "assets" / "reward_data"
HARMLESS_KINDS = ("refusal", "benign", "harmful")


@dataclass(frozen=True)
class Turn:
    """One question -> answer turn of a chatterbot conversation."""

    prompt: str
    response: str
    category: str  # the YAML file's stem, e.g. "trivia", "humor"
    group: int  # conversations sharing a prompt share a group: split by group, never by turn


@dataclass(frozen=True)
class HarmlessExample:
    prompt: str
    response: str
    label: int  # 1 = harmless (refusal, safe redirection, benign answer), 0 = harmful compliance
    kind: str  # one of HARMLESS_KINDS


def _clean(text: object) -> str:
    return " ".join(str(text).split())


def chatterbot_turns() -> list[Turn]:
    """Every unique consecutive (line i -> line i+1) turn of the English chatterbot corpus.

    Conversations that share a prompt (after whitespace/case normalisation) are merged into
    one group (union-find), so a held-out group never has its question seen in training.
    Entries that are not lists of strings (the corpus has one stray string) are skipped.
    """
    import yaml

    root = importlib.resources.files("chatterbot_corpus") / "data" / "english"
    files = sorted((f for f in root.iterdir() if f.name.endswith(".yml")), key=lambda f: f.name)
    if not files:
        raise RuntimeError(f"no chatterbot YAML files under {root}")
    conversations: list[tuple[str, list[str]]] = []
    for f in files:
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations", []):
            if isinstance(conv, list) and len(conv) >= 2:
                conversations.append((f.name[: -len(".yml")], [_clean(x) for x in conv]))

    parent = list(range(len(conversations)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_owner: dict[str, int] = {}
    for ci, (_, lines) in enumerate(conversations):
        for prompt in lines[:-1]:
            key = prompt.lower()
            if key in first_owner:
                parent[find(ci)] = find(first_owner[key])
            else:
                first_owner[key] = ci

    turns, seen = [], set()
    for ci, (category, lines) in enumerate(conversations):
        for prompt, response in zip(lines, lines[1:]):
            if not prompt or not response or (prompt, response) in seen:
                continue
            seen.add((prompt, response))
            turns.append(Turn(prompt, response, category, find(ci)))
    return turns


def jokes() -> list[str]:
    """pyjokes' English jokes (all categories), deduplicated, in a fixed order."""
    import pyjokes

    return sorted({_clean(j) for j in pyjokes.get_jokes("en", "all")})


def harmless_examples(path: Path | None = None) -> list[HarmlessExample]:
    """The labelled harmless/harmful examples, validated line by line."""
    path = Path(path) if path else DATA_DIR / "harmless.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"harmless training data not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ex = HarmlessExample(str(row["prompt"]), str(row["response"]), int(row["label"]), row["kind"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: not a valid example ({err})") from err
        if (
            ex.label not in (0, 1)
            or ex.kind not in HARMLESS_KINDS
            or (ex.label == 0) != (ex.kind == "harmful")
        ):
            raise ValueError(f"{path}:{n}: label {ex.label} / kind {ex.kind!r} are inconsistent")
        out.append(ex)
    return out


def informative_sentences(path: Path | None = None) -> list[str]:
    """Plain factual sentences (non-jokes), one per line, '#' lines skipped."""
    path = Path(path) if path else DATA_DIR / "informative.txt"
    if not path.is_file():
        raise FileNotFoundError(f"informative sentences not found: {path}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]
