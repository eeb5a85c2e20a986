"""One generate / stream API that the CLI, the app and the evaluation share.

The preference travels with the call: it is routed to anchor weights and set for this
call only (see :mod:`hoe_core.routing.context`). Streaming runs ``generate`` in a worker
thread that inherits the caller's context, so the routing reaches it too; when the
consumer stops iterating (closes the generator, e.g. a client disconnected) the worker
stops at the next token.

Concurrent calls share the model but nothing else: greedy calls run side by side;
sampled calls draw from torch's global RNG, so each holds it (seeded) for its whole call.
"""

from __future__ import annotations

import contextvars
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    notes: list[str] = field(default_factory=list)  # what was done to the prompt (cut, dropped)


PROMPT_RANGE = f"1 to {MAX_PROMPT_CHARS:,} characters of UTF-8 text"


def check_prompt(prompt: object) -> tuple[str, list[str]]:
    """Validate a prompt -> (clean text, notes for the user).

    The prompt must be UTF-8 text (``bytes`` are decoded; undecodable bytes, also as
    the lone surrogates Python uses for them in ``sys.argv``, are refused) that is not
    blank. CRLF becomes LF; other control characters than newline and tab are dropped,
    and text longer than MAX_PROMPT_CHARS is cut; each of these adds a note saying so.
    """
    if isinstance(prompt, (bytes, bytearray)):
        try:
            prompt = bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"prompt is not valid UTF-8 (byte 0x{err.object[err.start]:02x} at position "
                f"{err.start}: {err.reason}); allowed: {PROMPT_RANGE}"
            ) from None
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text ({PROMPT_RANGE}), got {type(prompt).__name__}")
    for i, ch in enumerate(prompt):
        if "\ud800" <= ch <= "\udfff":  # surrogateescape'd bytes or a broken UTF-16 pair
            byte = f"byte 0x{ord(ch) - 0xDC00:02x}" if ch >= "\udc80" else f"U+{ord(ch):04X}"
            raise ValueError(f"prompt is not valid UTF-8 ({byte} at character {i}); allowed: {PROMPT_RANGE}")
    notes = []
    prompt = prompt.replace("\r\n", "\n")  # Windows line ends are line ends, not noise
    text = "".join(ch for ch in prompt if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    if len(text) < len(prompt):
        dropped = len(prompt) - len(text)
        notes.append(f"dropped {dropped} control character{'s' * (dropped != 1)} from the prompt")
    if not text.strip():
        raise ValueError(f"prompt is empty; allowed: {PROMPT_RANGE}")
    if len(text) > MAX_PROMPT_CHARS:
        notes.append(
            f"prompt cut to its first {MAX_PROMPT_CHARS:,} of {len(text):,} characters "
            f"(the limit is {MAX_PROMPT_CHARS:,})"
        )
        text = text[:MAX_PROMPT_CHARS]
    return text, notes


def clean_prompt(prompt: object) -> str:
    """:func:`check_prompt` without the notes."""
    return check_prompt(prompt)[0]


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


_RNG_LOCK = threading.Lock()


@contextmanager
def seeded(decoding: DecodingConfig) -> Iterator[None]:
    """Seed torch's global RNG for a sampled call and hold it until the call ends, so two
    users sampling at once cannot interleave their draws (each gets what it would get
    alone). Greedy calls use no RNG and do not wait."""
    if decoding.greedy:
        yield
        return
    with _RNG_LOCK:
        torch.manual_seed(decoding.seed)
        yield


class _Active:
    """How many generations are running now (streaming workers and batched calls)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0

    @contextmanager
    def track(self) -> Iterator[None]:
        with self._lock:
            self._n += 1
        try:
            yield
        finally:
            with self._lock:
                self._n -= 1

    @property
    def count(self) -> int:
        return self._n


ACTIVE = _Active()


def active_generations() -> int:
    """Generations running in this process right now (0 once every caller has finished or
    gone away)."""
    return ACTIVE.count


def _stop_when(event: threading.Event):
    """A StoppingCriteria that ends every row once ``event`` is set."""
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full(
                (input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return _Stop()


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
    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts must be a list of prompts, not one string")
    checked = [check_prompt(p) for p in prompts]
    prompts = [text for text, _ in checked]
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
    with (
        ACTIVE.track(),
        seeded(decoding),
        hoe.routing(anchor_weights=weights, record_gates=record_gates) as routing,
        torch.no_grad(),
    ):
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
                notes=checked[i][1],
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


class _TokenStreamer:
    """Collects the new token ids from ``generate`` (a transformers streamer: ``put`` gets the
    prompt first, then each step's tokens; ``end`` once). The consumer is woken on every
    token, not only at word ends, so it can stop the generation promptly."""

    def __init__(self) -> None:
        import queue

        self.ids: list[int] = []
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self._prompt_seen = False
        self._ended = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self.events.put(len(self.ids))

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.events.put(None)

    def __iter__(self) -> Iterator[int]:
        """The number of new tokens so far, after each token, until the end."""
        while (n := self.events.get()) is not None:
            yield n


def stream(
    hoe: HoEModel,
    tokenizer,
    prompt: str,
    preference: Sequence[float],
    decoding: DecodingConfig = DecodingConfig(),
    anchor_weights: torch.Tensor | None = None,
) -> Iterator[str]:
    """Yield the answer's text as it grows (cumulative), once per generated token.

    ``anchor_weights`` (1, K) replaces routing the preference (baselines that mix experts
    themselves; all zeros is the bare backbone). Closing the generator early (the caller
    went away) stops the generation at the next token."""
    from transformers import StoppingCriteriaList

    prompt = clean_prompt(prompt)
    weights = hoe.anchor_weights([preference]) if anchor_weights is None else anchor_weights
    device = next(hoe.model.parameters()).device
    enc = encode_chat(tokenizer, [prompt], device)
    streamer = _TokenStreamer()
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with ACTIVE.track(), seeded(decoding), hoe.routing(anchor_weights=weights), torch.no_grad():
                if stop.is_set():  # the caller left while this call waited for the RNG
                    return
                hoe.model.generate(
                    **enc,
                    **generate_kwargs(decoding, tokenizer),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_stop_when(stop)]),
                )
        except BaseException as err:  # surfaced in the caller's thread below
            errors.append(err)
        finally:
            streamer.end()

    ctx = contextvars.copy_context()
    thread = threading.Thread(target=ctx.run, args=(work,), daemon=True, name="hoe-stream")
    thread.start()
    text = ""
    try:
        for n in streamer:  # every token, even when the text did not change: a closing
            # caller is noticed within one token. An unfinished multi-byte character decodes
            # to U+FFFD: it is held back until its other bytes arrive.
            text = tokenizer.decode(streamer.ids[:n], skip_special_tokens=True).rstrip("\ufffd")
            yield text
    finally:
        stop.set()  # no-op when finished; ends the generation when the caller went away
    thread.join()
    if errors:
        raise errors[0]
    final = tokenizer.decode(streamer.ids, skip_special_tokens=True)
    if final != text:
        yield final
