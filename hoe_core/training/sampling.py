"""Recipe step 1: sample k responses per prompt from the backbone, score them with every
reward model, and cache both on disk (resumable, shared by all objectives).

    prompts ──chunks of `batch_size`──► k samples each ──► responses/chunk_00007.jsonl
                                        (seeded per chunk; atomic write; done chunks skipped)
    responses ──every reward──► scores/<reward>.json (reused while the responses are unchanged)

Under ``accelerate launch`` each process takes its share of the chunks
(see :mod:`hoe_core.training.distributed`) and the main process waits for all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from hoe_core.config import DecodingConfig
from hoe_core.generation import encode_chat, generate_kwargs


class Scorer(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class SamplingConfig:
    """How the shared sample cache is made."""

    k: int = 4  # responses per prompt
    max_new_tokens: int = 48
    temperature: float = 0.9
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    batch_size: int = 32  # prompts x samples per generate call is batch_size rows
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (pairs need two samples), got {self.k}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def decoding(self) -> DecodingConfig:
        return DecodingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )


@dataclass(frozen=True)
class Sample:
    prompt_id: str
    prompt: str
    response: str
    rewards: dict[str, float]  # raw reward per objective


def _chunk_path(cache: Path, index: int) -> Path:
    return cache / f"chunk_{index:05d}.jsonl"


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)  # a chunk is either complete on disk or absent


def _sample_chunk(model, tokenizer, prompts: list[str], cfg: SamplingConfig, seed: int) -> list[str]:
    """k sampled responses per prompt, in prompt-major order: (len(prompts) * k,)."""
    device = next(model.parameters()).device
    enc = encode_chat(tokenizer, prompts, device)
    kwargs = generate_kwargs(cfg.decoding(), tokenizer)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs, num_return_sequences=cfg.k)
    new = out[:, enc["input_ids"].shape[1] :]  # (len(prompts) * k, T_new)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def sample_responses(
    model, tokenizer, prompts: Sequence[tuple[str, str]], cfg: SamplingConfig, cache_dir: str | Path
) -> list[dict]:
    """Sample k responses per prompt into ``cache_dir/chunk_*.jsonl`` (resumable).

    Chunk i is seeded with ``cfg.seed + i``, so a resumed run gives the same samples as an
    uninterrupted one. Returns records {"prompt_id", "prompt", "response"}, prompt-major.
    """
    from hoe_core.training.distributed import state as process_state

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    per_chunk = max(1, cfg.batch_size // cfg.k)
    chunks = [list(prompts[i : i + per_chunk]) for i in range(0, len(prompts), per_chunk)]
    state = process_state()
    state.wait_for_everyone()  # every process must see the same done chunks, or some are skipped
    todo = [i for i in range(len(chunks)) if not _chunk_path(cache, i).is_file()]
    with state.split_between_processes(todo) as mine:
        for i in tqdm(mine, desc="sample", unit="chunk", disable=not state.is_local_main_process):
            ids, texts = zip(*chunks[i])
            responses = _sample_chunk(model, tokenizer, list(texts), cfg, cfg.seed + i)
            records = [
                {"prompt_id": pid, "prompt": p, "response": r}
                for (pid, p), r in zip([(x, t) for x, t in zip(ids, texts) for _ in range(cfg.k)], responses)
            ]
            _write_atomic(_chunk_path(cache, i), [json.dumps(r, ensure_ascii=False) + "\n" for r in records])
    state.wait_for_everyone()
    files = sorted(cache.glob("chunk_*.jsonl"))
    if len(files) != len(chunks):
        raise RuntimeError(f"sample cache {cache} has {len(files)} of {len(chunks)} chunks")
    records = []
    for f in files:
        for line_no, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            try:
                d = json.loads(line)
                records.append({k: d[k] for k in ("prompt_id", "prompt", "response")})
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{f}:{line_no}: bad sample record ({err})") from None
    return records


def score_responses(
    records: Sequence[dict], rewards: Mapping[str, Scorer], cache_dir: str | Path
) -> list[Sample]:
    """Score every record with every reward, caching ``scores/<name>.json`` per reward.

    A reward's cache is reused only if it was computed on exactly these responses (sha256
    of the texts), so resampling or new prompts rescore automatically."""
    import hashlib

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(
        "\x00".join(r["prompt"] + "\x01" + r["response"] for r in records).encode()
    ).hexdigest()
    prompts = [r["prompt"] for r in records]
    responses = [r["response"] for r in records]
    values: dict[str, list[float]] = {}
    for name, rm in rewards.items():
        path = cache / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("responses_sha256") == digest:
                values[name] = saved["values"]
                continue
        values[name] = [float(v) for v in np.asarray(rm.score(prompts, responses), float)]
        _write_atomic(path, [json.dumps({"responses_sha256": digest, "values": values[name]}) + "\n"])
    return [
        Sample(r["prompt_id"], r["prompt"], r["response"], {n: values[n][j] for n in rewards})
        for j, r in enumerate(records)
    ]


def sample_and_score(
    model,
    tokenizer,
    prompts: Sequence[tuple[str, str]],
    rewards: Mapping[str, Scorer],
    cfg: SamplingConfig,
    cache_dir: str | Path,
) -> list[Sample]:
    """Recipe step 1: ``cache_dir/responses`` (sampled once) + ``cache_dir/scores`` (per reward).

    Args:
        model: a causal LM (the backbone, no experts active).
        prompts: (id, text) pairs.
        rewards: objective name -> reward model with ``score(prompts, responses) -> (B,)``.
    """
    records = sample_responses(model, tokenizer, prompts, cfg, Path(cache_dir) / "responses")
    return score_responses(records, rewards, Path(cache_dir) / "scores")


def preference_pairs(
    samples: Sequence[Sample], objective: str, min_gap: float = 0.0, max_pairs: int | None = None
) -> list[dict]:
    """Best-vs-worst pair per prompt on one objective (DPO data).

    Returns dicts {"prompt", "chosen", "rejected", "gap"} for prompts whose best and worst
    raw rewards differ by more than ``min_gap``; with ``max_pairs``, only the pairs with the
    largest gaps (the clearest preferences; a short DPO run sees each of them), in prompt order.
    """
    by_prompt: dict[str, list[Sample]] = {}
    for s in samples:
        by_prompt.setdefault(s.prompt_id, []).append(s)
    pairs = []
    for group in by_prompt.values():
        ranked = sorted(group, key=lambda s: s.rewards[objective])
        worst, best = ranked[0], ranked[-1]
        gap = best.rewards[objective] - worst.rewards[objective]
        if gap > min_gap and best.response != worst.response:
            pairs.append(
                {"prompt": best.prompt, "chosen": best.response, "rejected": worst.response, "gap": gap}
            )
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = sorted(sorted(range(len(pairs)), key=lambda i: -pairs[i]["gap"])[:max_pairs])
        pairs = [pairs[i] for i in keep]
    return pairs
