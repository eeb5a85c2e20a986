"""What the app does, as plain functions over one loaded bundle (no Gradio here).

    Session.load(bundle)           backbone + experts + routers, reward models, fronts
    session.steer(prompt, lam)     stream HoE's answer (cumulative text)
    session.score(prompt, text)    (N,) rewards, normalised like the fronts
    session.router_weights(lam)    which experts / routers the preference router picks
    session.compare(prompt, lam)   HoE, RS, MOD, base one after another, streamed
    session.gates(prompt, answer, lam)   token x expert gates of an answer (Inside tab)

The model is shared by every call; the preference travels with the call (see
:mod:`hoe_core.routing.context`), so concurrent users never see each other's mixture.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hoe_core.bundle import LoadedBundle, load_bundle
from hoe_core.config import APP_MAX_NEW_TOKENS, DecodingConfig, as_float, as_int
from hoe_core.generation import clean_prompt, encode_chat, stream
from hoe_core.routing import fused_cpu
from hoe_core.routing.preference import normalize_preference
from hoe_core.ui.fronts import Fronts, find_fronts

COMPARE_METHODS = ("hoe", "rs", "mod", "base")


@dataclass
class Answer:
    """One method's answer in the Compare tab."""

    method: str
    text: str = ""
    seconds: float = 0.0
    tokens: int = 0
    rewards: list[float] | None = None
    done: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Session:
    loaded: LoadedBundle
    rewards: dict | None = None
    normalizers: dict | None = None
    fronts: Fronts | None = None
    load_seconds: float = 0.0
    methods: dict = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        precision: str,
        device: str | None = None,
        fronts_dir: str | Path | None = None,
        with_rewards: bool = True,
    ) -> Session:
        from hoe_core.evaluation.run import bundle_rewards

        start = time.perf_counter()
        loaded = load_bundle(bundle, precision=precision, device=device)
        layer = next(iter(loaded.hoe.layers.values()), None)
        if layer is not None and layer.lora_A.device.type == "cpu":
            fused_cpu.warm_up(layer.lora_A.dtype)  # compile the decode kernels before the first request
        rewards, normalizers = bundle_rewards(loaded.manifest) if with_rewards else (None, None)
        fronts = None
        if fronts_dir is not None and Path(fronts_dir).is_dir():
            fronts = find_fronts(fronts_dir, loaded.objectives, precision)
        return cls(loaded, rewards, normalizers, fronts, time.perf_counter() - start)

    @property
    def objectives(self) -> list[str]:
        return self.loaded.objectives

    @property
    def tokenizer(self):
        return self.loaded.backbone.tokenizer

    def preference(self, sliders: Sequence[float]) -> np.ndarray:
        return normalize_preference(sliders, len(self.objectives))

    def decoding(self, max_new_tokens, temperature, seed) -> DecodingConfig:
        """The widgets' decoding settings (top-p and repetition penalty: the bundle's).

        Raises ValueError naming the field and its allowed range; the app generates at most
        APP_MAX_NEW_TOKENS tokens per request."""
        base = self.loaded.manifest.decoding_config
        n = as_int("max_new_tokens", max_new_tokens)
        if not 1 <= n <= APP_MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in [1, {APP_MAX_NEW_TOKENS}] in the app, got {n}")
        return DecodingConfig(
            max_new_tokens=n,
            temperature=as_float("temperature", temperature),
            top_p=base.top_p,
            repetition_penalty=base.repetition_penalty,
            seed=as_int("seed", seed),
        )

    def router_weights(self, lam: Sequence[float]) -> list[tuple[str, float]]:
        """(anchor name, weight) for every expert / router the preference router uses."""
        weights = self.loaded.hoe.anchor_weights([self.preference(lam)])[0].tolist()
        names = self.loaded.hoe.expert_names + [r.name for r in self.loaded.hoe.routers]
        return [(n, w) for n, w in zip(names, weights) if w > 0]

    def score(self, prompt: str, text: str) -> list[float] | None:
        """The answer's reward per objective (normalised when the bundle records how)."""
        if self.rewards is None:
            return None
        out = []
        for o in self.objectives:
            raw = np.asarray(self.rewards[o].score([prompt], [text]), float)
            out.append(float((self.normalizers[o](raw) if self.normalizers else raw)[0]))
        return out

    def steer(self, prompt: str, lam: Sequence[float], decoding: DecodingConfig) -> Iterator[str]:
        """HoE's answer at ``lam``, cumulative text per token (closing it stops the generation)."""
        yield from stream(
            self.loaded.hoe, self.tokenizer, clean_prompt(prompt), self.preference(lam), decoding
        )

    def _method(self, name: str, decoding: DecodingConfig):
        from hoe_core.baselines import make_method

        key = (name, decoding)
        if key not in self.methods:
            self.methods[key] = make_method(name, self.loaded, decoding)
        return self.methods[key]

    def compare(
        self,
        prompt: str,
        lam: Sequence[float],
        decoding: DecodingConfig,
        methods: Sequence[str] = COMPARE_METHODS,
    ) -> Iterator[list[Answer]]:
        """Each method's answer in turn, streamed; yields the list of answers after every token."""
        prompt, lam = clean_prompt(prompt), self.preference(lam)
        answers = [Answer(m) for m in methods]
        for a in answers:
            start = time.perf_counter()
            with closing(self._stream(a.method, prompt, lam, decoding)) as pieces:
                for text in pieces:
                    a.text, a.seconds = text, time.perf_counter() - start
                    yield answers
            a.seconds = time.perf_counter() - start
            a.tokens = len(self.tokenizer(a.text, add_special_tokens=False)["input_ids"])
            a.rewards = self.score(prompt, a.text)
            a.done = True
            yield answers

    def _stream(self, method: str, prompt: str, lam: np.ndarray, decoding: DecodingConfig) -> Iterator[str]:
        """Cumulative text of ``method``'s answer, token by token (merge baselines: at once)."""
        from hoe_core.baselines.mod import mod_stream
        from hoe_core.baselines.soups import mixture_weights, vertex_experts

        hoe = self.loaded.hoe
        if method == "hoe":
            yield from self.steer(prompt, lam, decoding)
        elif method in ("rs", "base"):
            experts = vertex_experts(hoe)
            weights = mixture_weights(hoe, experts, lam if method == "rs" else np.zeros(len(lam)), 1)
            yield from stream(hoe, self.tokenizer, prompt, lam, decoding, anchor_weights=weights)
        elif method == "mod":
            yield from mod_stream(hoe, self.tokenizer, prompt, lam, decoding)
        else:
            yield self._method(method, decoding)([prompt], lam)[0]

    @torch.no_grad()
    def gates(
        self, prompt: str, answer: str, lam: Sequence[float]
    ) -> tuple[list[str], np.ndarray, list[str]]:
        """The answer's tokens, their gates over the experts (T, E), averaged over layers,
        and the expert names: one forward of prompt + answer with the gates recorded."""
        hoe, tok = self.loaded.hoe, self.tokenizer
        device = next(hoe.model.parameters()).device
        enc = encode_chat(tok, [clean_prompt(prompt)], device)
        answer_ids = tok(answer, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        if answer_ids.shape[1] == 0:
            raise ValueError("there is no answer to inspect yet")
        ids = torch.cat([enc["input_ids"], answer_ids], 1)
        with hoe.routing([self.preference(lam)], record_gates=True) as routing:
            hoe.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        n = answer_ids.shape[
            1
        ]  # the gate at position p chose token p + 1: answer token j <- p = plen + j - 1
        per_module = [steps[0][0, -n - 1 : -1] for steps in routing.gates.values()]  # (T, E) each
        gates = torch.stack(per_module).mean(0).numpy()
        tokens = [tok.decode([t]) for t in answer_ids[0].tolist()]
        return tokens, gates, list(hoe.expert_names)
