"""Generate over a preference grid and score: the rows every front, table and plot is made of.

for each lambda in the grid, for each batch of prompts:
    texts = method(prompts, lambda)            (greedy by default: deterministic)
    r_i   = reward_i(prompts, texts)           (raw; normalised where normalisers are given)
-> rows {method, prompt_id, w_<obj>, r_<obj>, text}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from hoe_core.evaluation.metrics import hypervolume
from hoe_core.training.sampling import Scorer

#: A method under evaluation: (prompts, preference (N,)) -> texts.
Method = Callable[[Sequence[str], np.ndarray], list[str]]


def evaluate_grid(
    method_name: str,
    method: Method,
    prompts: Sequence[tuple[str, str]],
    grid: np.ndarray,
    objectives: Sequence[str],
    rewards: Mapping[str, Scorer],
    normalizers: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict]:
    """One row per (preference, prompt). ``prompts`` are (id, text); ``grid`` is (G, N)."""
    rows: list[dict] = []
    total = len(grid) * ((len(prompts) + batch_size - 1) // batch_size)
    bar = tqdm(total=total, desc=f"evaluate {method_name}", disable=not progress)
    for lam in np.asarray(grid, float):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, texts_in = [c[0] for c in chunk], [c[1] for c in chunk]
            texts = method(texts_in, lam)
            scores = {}
            for o in objectives:
                raw = np.asarray(rewards[o].score(texts_in, texts), float)
                scores[o] = normalizers[o](raw) if normalizers else raw
            for j, pid in enumerate(ids):
                row = {"method": method_name, "prompt_id": pid}
                row.update({f"w_{o}": float(lam[i]) for i, o in enumerate(objectives)})
                row.update({f"r_{o}": float(scores[o][j]) for o in objectives})
                row["text"] = texts[j]
                rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def mean_front(rows: Sequence[dict], objectives: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean reward per preference: (preferences (G, N), mean rewards (G, N)), grid order kept."""
    keys: dict[tuple, list[np.ndarray]] = {}
    for r in rows:
        key = tuple(r[f"w_{o}"] for o in objectives)
        keys.setdefault(key, []).append(np.array([r[f"r_{o}"] for o in objectives]))
    prefs = np.array(list(keys))
    means = np.array([np.mean(v, axis=0) for v in keys.values()])
    return prefs, means


def front_hypervolume(rows: Sequence[dict], objectives: Sequence[str], reference: np.ndarray) -> float:
    """Hypervolume of the mean-reward points of a method over its grid."""
    _, means = mean_front(rows, objectives)
    return hypervolume(means, reference)


def hoe_method(hoe, tokenizer, decoding) -> Method:
    """HoE as a Method: one batched pass per call, every row at the same preference."""
    from hoe_core.generation import generate

    def run(prompts: Sequence[str], lam: np.ndarray) -> list[str]:
        return [g.text for g in generate(hoe, tokenizer, list(prompts), [lam] * len(prompts), decoding)]

    return run


def model_method(model, tokenizer, decoding) -> Method:
    """A plain causal LM as a Method (the preference is ignored): the base model, or any
    HoE-wrapped model outside a routing block (which is the bare backbone)."""
    import torch

    from hoe_core.generation import encode_chat, generate_kwargs

    def run(prompts: Sequence[str], lam: np.ndarray) -> list[str]:
        enc = encode_chat(tokenizer, list(prompts), next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(**enc, **generate_kwargs(decoding, tokenizer))
        plen = enc["input_ids"].shape[1]
        return [tokenizer.decode(r[plen:], skip_special_tokens=True).strip() for r in out]

    return run
