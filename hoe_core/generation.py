"""One generate / stream API that the CLI, the app and the evaluation share.

The preference travels with the call: it is routed to anchor weights and set for this
call only (see :mod:`hoe_core.routing.context`). Streaming runs ``generate`` in a worker
thread that inherits the caller's context, so the routing reaches it too.
"""

from __future__ import annotations

import contextvars
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hoe_core.config import MAX_PROMPT_CHARS, DecodingConfig
from hoe_core.routing.model import HoEModel
from hoe_core.routing.preference import normalize_preference


@dataclass
class Generation:
    """One answer and what produced it."""

    prompt: str
    text: str
    preference: list[float]  # normalised, (N,)
    anchor_weights: list[float]  # (K,) over experts then routers
    new_tokens: int
    seconds: float
    gates: dict[str, np.ndarray] = field(default_factory=dict)  # module -> (T_new, E)


def clean_prompt(prompt: object) -> str:
    """Validate a prompt: a non-blank string; control characters (except newline and
    tab) are dropped; longer than MAX_PROMPT_CHARS is cut."""
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"prompt is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
    text = "".join(ch for ch in prompt if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    if not text.strip():
        raise ValueError("prompt is empty")
    return text[:MAX_PROMPT_CHARS]


def encode_chat(tokenizer, prompts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Apply the chat template to user prompts and left-pad them. -> input_ids (B, T)."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


def generate_kwargs(decoding: DecodingConfig, tokenizer) -> dict:
    kwargs = dict(
        max_new_tokens=decoding.max_new_tokens,
        repetition_penalty=decoding.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=not decoding.greedy,
    )
    if decoding.greedy:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
    return kwargs


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the generation config's (one or a list) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def seed_sampling(decoding: DecodingConfig) -> None:
    if not decoding.greedy:  # greedy decoding needs no RNG
        torch.manual_seed(decoding.seed)


def generate(
    hoe: HoEModel,
    tokenizer,
    prompts: Sequence[str],
    preferences: Sequence[Sequence[float]],
    decoding: DecodingConfig = DecodingConfig(),
    record_gates: bool = False,
    anchor_weights: torch.Tensor | None = None,
) -> list[Generation]:
    """Generate one answer per (prompt, preference) row in one batched pass.

    Args:
        prompts: B user prompts (chat template applied here).
        preferences: (B, N) raw preferences, normalised here.
        anchor_weights: (B, K) weights over the anchors to use instead of routing the
            preferences (baselines that mix the experts themselves, e.g. Rewarded Soups).
    """
    if len(prompts) != len(preferences):
        raise ValueError(f"{len(prompts)} prompts but {len(preferences)} preferences")
    prompts = [clean_prompt(p) for p in prompts]
    if anchor_weights is None:
        weights = hoe.anchor_weights(preferences)  # validates and normalises; (B, K)
    else:
        weights = torch.as_tensor(anchor_weights, dtype=torch.float32)
        if weights.shape != (len(prompts), len(hoe.anchors)):
            raise ValueError(
                f"anchor_weights must be ({len(prompts)}, {len(hoe.anchors)}), got {tuple(weights.shape)}"
            )
    device = next(hoe.model.parameters()).device
    enc = encode_chat(tokenizer, prompts, device)
    start = time.perf_counter()
    seed_sampling(decoding)
    with hoe.routing(anchor_weights=weights, record_gates=record_gates) as routing, torch.no_grad():
        out = hoe.model.generate(**enc, **generate_kwargs(decoding, tokenizer))
    seconds = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1] :]
    results = []
    for i, prompt in enumerate(prompts):
        n_new = int((new[i] != tokenizer.pad_token_id).sum())
        gates = _row_gates(routing.gates, i) if record_gates else {}
        results.append(
            Generation(
                prompt=prompt,
                text=tokenizer.decode(new[i], skip_special_tokens=True).strip(),
                preference=normalize_preference(preferences[i], len(hoe.objectives)).tolist(),
                anchor_weights=weights[i].tolist(),
                new_tokens=n_new,
                seconds=seconds,
                gates=gates,
            )
        )
    return results


def _row_gates(gates: dict[str, list[torch.Tensor]], row: int) -> dict[str, np.ndarray]:
    """Per module, the gates of one batch row over generated positions: (T_new, E).

    The first record is the prompt's forward; its last position produced the first
    new token, and each later record is one decoding step."""
    out = {}
    for module, steps in gates.items():
        first = steps[0][row, -1:]  # (1, E)
        rest = [s[row, -1:] for s in steps[1:]]
        out[module] = torch.cat([first, *rest], 0).numpy()
    return out


def stream(
    hoe: HoEModel,
    tokenizer,
    prompt: str,
    preference: Sequence[float],
    decoding: DecodingConfig = DecodingConfig(),
    anchor_weights: torch.Tensor | None = None,
) -> Iterator[str]:
    """Yield the answer's text as it grows (cumulative), token by token.

    ``anchor_weights`` (1, K) replaces routing the preference (baselines that mix experts
    themselves; all zeros is the bare backbone)."""
    from transformers import TextIteratorStreamer

    prompt = clean_prompt(prompt)
    weights = hoe.anchor_weights([preference]) if anchor_weights is None else anchor_weights
    device = next(hoe.model.parameters()).device
    enc = encode_chat(tokenizer, [prompt], device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            seed_sampling(decoding)
            with hoe.routing(anchor_weights=weights), torch.no_grad():
                hoe.model.generate(**enc, **generate_kwargs(decoding, tokenizer), streamer=streamer)
        except BaseException as err:  # surfaced in the caller's thread below
            errors.append(err)
            streamer.end()

    ctx = contextvars.copy_context()
    thread = threading.Thread(target=ctx.run, args=(work,), daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if errors:
        raise errors[0]
