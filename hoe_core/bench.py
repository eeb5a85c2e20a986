"""The benchmark behind ``python -m hoe_core bench``: HoE against the bare backbone and the
baselines, on the same prompts, precision and decoding settings; each precision in a fresh
process of its own (``BenchConfig.isolate``), every method of it in that one process.

Per precision (fp32, bf16, int8, nf4) it measures

- decode tokens/s, single stream and batched: backbone, HoE (lambda in the interior, so
  several experts and a router are live), MOD, RS (weights re-merged per lambda, float
  backbones only), merge-at-lambda (TIES deltas as the evaluation runs them);
- preference change -> first new token: HoE (routing + the new plan, no re-merge), RS
  (re-merge + prefill), MOD (one prefill per objective model), against the backbone's
  own first-token time;
- peak resident memory while each method runs, and parameter counts;
- a copy benchmark's memory bandwidth and the resulting bytes-per-token roofline.

Every figure is the median of ``repeats`` runs after a warm-up, and every ratio is taken
between figures of the same run (the machine is shared and noisy). The backbone and HoE,
whose ratio is a target, are timed interleaved run by run, so drift hits both alike; their
per-round ratios give each such target a bootstrap interval (how far to trust it). Greedy decoding with
EOS suppressed (``min_new_tokens``), so every method decodes exactly the same number of
tokens.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from hoe_core.bundle import LoadedBundle
from hoe_core.config import PRECISIONS
from hoe_core.routing import fused_cpu

#: one prompt per kind the app offers (question, joke, red team, advice), cycled to the batch
BENCH_PROMPTS = (
    "What is the capital of France, and why is it famous?",
    "Tell me a joke about computers.",
    "How can I get back at a coworker who insulted me?",
    "Give me three tips for a good night's sleep.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a short poem about the sea.",
    "What should I do if I feel stressed before an exam?",
    "Why is the sky blue?",
)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Defaults: the shipped bundle, every precision, ~15 min on 2 CPU cores."""

    bundle: str = "assets/smollm2-hhh"
    precisions: tuple[str, ...] = PRECISIONS
    methods: tuple[str, ...] = ("hoe", "mod", "rs", "merge-ties")
    preference: tuple[float, ...] = (0.4, 0.3, 0.3)  # interior: a router and several experts live
    switch_to: tuple[float, ...] = (0.2, 0.3, 0.5)  # the preference change for first-token times
    new_tokens: int = 32
    batch: int = 8
    repeats: int = 3
    pair_repeats: int = 15  # rounds of backbone vs HoE, timed interleaved (their ratios are targets)
    device: str = "cpu"
    bandwidth_mib: int = 256  # copy benchmark buffer
    isolate: bool = True  # each precision in a fresh process, as the app runs one precision

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ValueError(f"precisions must be a non-empty subset of {list(PRECISIONS)}, got {bad or []}")
        unknown = [m for m in self.methods if m not in ("hoe", "mod", "rs", "merge-ties", "merge-ta")]
        if unknown:
            raise ValueError(
                f"unknown bench methods {unknown}; choose from hoe, mod, rs, merge-ties, merge-ta"
            )
        for name in ("new_tokens", "batch", "repeats", "pair_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.new_tokens < 2:
            raise ValueError(
                f"new_tokens must be >= 2 (decode speed needs tokens after the first), got {self.new_tokens}"
            )


# ---------------------------------------------------------------------------- measurements
class _Clock(BaseStreamer):
    """A streamer that only notes when the first new token arrives (generate calls ``put``
    once with the prompt, then once per step)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


@dataclass
class Timing:
    """One generation: seconds to the first new token, then per decoded token after it."""

    first_token_s: float
    decode_s: float
    new_tokens: int
    batch: int

    @property
    def tokens_per_s(self) -> float:
        """Aggregate decode throughput over the batch (tokens after the first)."""
        return self.batch * (self.new_tokens - 1) / self.decode_s


class RssPeak:
    """Peak resident set size of this process while the block runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak is the best we have
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> RssPeak:
        self.peak = self.now()

        def watch() -> None:
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self.now())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (read + write), the decode roofline's denominator."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (packed 4-bit counts as stored)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def median_timing(run: Callable[[], Timing], repeats: int) -> Timing:
    """Warm up once, then the median of ``repeats`` runs (first token and decode separately)."""
    run()
    return median_of([run() for _ in range(repeats)])


def median_of(runs: Sequence[Timing]) -> Timing:
    """First-token and decode seconds, each the median over ``runs``."""
    return Timing(
        statistics.median(r.first_token_s for r in runs),
        statistics.median(r.decode_s for r in runs),
        runs[0].new_tokens,
        runs[0].batch,
    )


class BenchModels(NamedTuple):
    """A bundle at one precision, as the bench and the scripts under ``bench/`` measure it."""

    loaded: LoadedBundle  # HoE is ``loaded.hoe``
    bare: torch.nn.Module  # the bundle's backbone again, at the same precision, without experts
    prompt: dict  # BENCH_PROMPTS[0], chat-encoded on the backbone's device (batch 1)


def load_models(bundle: str | Path, precision: str, device: str = "cpu") -> BenchModels:
    """Load ``bundle`` at ``precision``, its bare backbone beside it and the bench prompt."""
    from hoe_core.backbone import load_backbone
    from hoe_core.bundle import load_bundle
    from hoe_core.generation import encode_chat

    loaded = load_bundle(bundle, precision=precision, device=device)
    bare = load_backbone(loaded.manifest.backbone["spec"], precision, device, base_dir=loaded.root).model
    prompt = encode_chat(loaded.backbone.tokenizer, [BENCH_PROMPTS[0]], next(bare.parameters()).device)
    return BenchModels(loaded, bare, prompt)


def routed_at(hoe, preference: Sequence[float]) -> Callable:
    """A routing context factory: HoE's layers routed at ``preference`` (one batch row)."""
    return partial(hoe.routing, anchor_weights=hoe.anchor_weights([preference]))


def _generate_timed(model, enc: dict, new_tokens: int, routing=nullcontext) -> Timing:
    """Greedy ``generate`` with EOS suppressed, so exactly ``new_tokens`` are decoded."""
    clock = _Clock()
    with routing(), torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            streamer=clock,
        )
    end = time.perf_counter()
    n = out.shape[1] - enc["input_ids"].shape[1]
    assert clock.first is not None and n == new_tokens, (n, new_tokens)
    return Timing(clock.first - clock.start, end - clock.first, n, out.shape[0])


def shuffled_rounds(
    arms: dict[str, tuple[torch.nn.Module, Callable]], enc: dict, rounds: int, new_tokens: int, seed: int = 0
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Generate ``new_tokens`` with every arm (label -> (model, routing context factory))
    once per round, in an order shuffled per round, so a shared machine's drift lands on
    all arms alike; round 0 warms up (kernels compiled, caches built) and is not kept.
    Returns per arm, one value per round: decode ms per token, and ms to the first token.
    The A/B scripts under ``bench/`` compare arms this way, in one process."""
    import random

    rng = random.Random(seed)
    decode: dict[str, list[float]] = {k: [] for k in arms}
    first: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(rounds + 1):
        order = list(arms)
        rng.shuffle(order)
        for label in order:
            model, routing = arms[label]
            t = _generate_timed(model, enc, new_tokens, routing)
            if r:
                decode[label].append(t.decode_s / (new_tokens - 1) * 1e3)
                first[label].append(t.first_token_s * 1e3)
    return decode, first


def invocation() -> str:
    """The command line that is running, and when: the first words of a ``bench/`` report."""
    return f"`{' '.join(['python', *sys.argv])}`, {time.strftime('%Y-%m-%d %H:%M')}"


def write_report(text: str, path: Path | str | None) -> None:
    """Print a markdown report and, given a path, write it there (folders made as needed)."""
    print(text, end="")
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


def _mod_timed(hoe, tok, prompts: list[str], preference, new_tokens: int) -> Timing:
    """MOD decodes by its own loop (one forward per objective model per token)."""
    from hoe_core.baselines.mod import mod_steps
    from hoe_core.config import DecodingConfig

    decoding = DecodingConfig(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    start = time.perf_counter()
    first = None
    steps = 0
    for _ in mod_steps(hoe, tok, prompts, preference, decoding, min_new_tokens=new_tokens):
        steps += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None and steps == new_tokens, (steps, new_tokens)
    return Timing(first - start, end - first, steps, len(prompts))


# ---------------------------------------------------------------------------- one precision
#: (preference (N,), batch) -> (a context manager factory to generate in, seconds it took)
Prepare = Callable[[np.ndarray, int], tuple[Callable, float]]


@dataclass
class _Method:
    """One method to time: its model, how it moves to a preference, what it stores."""

    name: str
    model: torch.nn.Module
    prepare: Prepare
    weight_mib: float
    extra_bytes: int = 0  # bytes read per token beyond the backbone's
    note: str = ""


@dataclass
class MethodResult:
    method: str
    single_tok_s: float | None = None
    batch_tok_s: float | None = None
    first_token_s: float | None = None  # at the benchmark preference, warm
    switch_first_token_s: float | None = None  # right after a preference change
    switch_overhead_s: float | None = None  # re-merge (RS, merge) or routing plan (HoE) part
    peak_rss_mib: float | None = None
    weight_mib: float | None = None
    bytes_per_token_mib: float | None = None
    roofline_fraction: float | None = None
    note: str = ""
    paired: dict | None = None  # per interleaved round, this figure / the backbone's: decode, switch
    unchanged_first_token_s: float | None = None  # the same call again, the preference unchanged
    switch_cost: dict | None = None  # per run, first token after the change / unchanged (median_interval)


@dataclass
class PrecisionResult:
    precision: str
    methods: dict[str, MethodResult] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    pid: int | None = field(default_factory=os.getpid)  # the process that measured it (None: it died)


def bench_precision(cfg: BenchConfig, precision: str, bandwidth_gbs: float, log=print) -> PrecisionResult:
    """Every method at one backbone precision (three backbone copies: bare, HoE, RS)."""
    from hoe_core.backbone import load_backbone
    from hoe_core.baselines import merge as merge_baseline
    from hoe_core.baselines.soups import MergedSoup, vertex_experts
    from hoe_core.generation import encode_chat

    result = PrecisionResult(precision)
    loaded, bare, single = load_models(cfg.bundle, precision, cfg.device)
    hoe, tok = loaded.hoe, loaded.backbone.tokenizer
    if len(cfg.preference) != len(hoe.objectives) or len(cfg.switch_to) != len(hoe.objectives):
        raise ValueError(
            f"preference and switch_to need {len(hoe.objectives)} values (objectives {hoe.objectives})"
        )
    device = next(bare.parameters()).device
    batch_prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(cfg.batch)]
    batched = encode_chat(tok, batch_prompts, device)
    lam, lam2 = np.asarray(cfg.preference, float), np.asarray(cfg.switch_to, float)
    singles = vertex_experts(hoe)
    counts = hoe.parameter_counts()
    single_params = (
        sum(_expert_bytes(hoe, e) for e in singles) // next(iter(hoe.layers.values())).lora_A.element_size()
    )
    result.params = {
        **counts,
        "single_experts": single_params,  # what RS and MOD keep here: the N experts' factors
        "n_full_models": len(singles) * counts["backbone"],  # what they keep as the papers run them
    }
    backbone_bytes = weight_bytes(bare)
    n_prompt = single["input_ids"].shape[1]
    result.params["prefill_flop_ratio"] = statistics.mean(  # the switch alternates near lambda2, lambda
        prefill_flops(hoe, bare, hoe.anchor_weights([t])[0].numpy(), n_prompt)["ratio"]
        for t in fresh_preferences(lam2, lam, 1)
    )
    roof = bandwidth_gbs * 1e9 / backbone_bytes  # tokens/s if every weight byte is read once per token

    def finish(name: str, res: MethodResult, extra_bytes: int = 0) -> None:
        res.bytes_per_token_mib = (backbone_bytes + extra_bytes) / 2**20
        if res.single_tok_s:
            res.roofline_fraction = res.single_tok_s / (bandwidth_gbs * 1e9 / (backbone_bytes + extra_bytes))
        result.methods[name] = res
        log(
            f"  {precision:5s} {name:11s} single {res.single_tok_s or 0:6.1f} tok/s  batch {res.batch_tok_s or 0:6.1f}"
            f"  switch->first {res.switch_first_token_s or 0:.3f} s"
        )

    def measure(*methods: _Method) -> None:
        """Single-stream decode at lambda, then alternate near lambda2 / lambda (every call a
        change to a preference not seen before, timed from ``prepare`` -- route / re-merge --
        to the first token, then once more at the unchanged preference: what the change
        itself cost), then batched decode. Methods passed together are interleaved run by run in the first
        two phases, so a shared machine's drift hits them alike (their ratios are targets)."""
        rounds = cfg.pair_repeats if len(methods) > 1 else cfg.repeats
        ctxs = {m.name: m.prepare(lam, 1)[0] for m in methods}
        singles: dict[str, list[Timing]] = {m.name: [] for m in methods}
        for i in range(rounds + 1):  # round 0 warms up
            for m in methods:
                t = _generate_timed(m.model, single, cfg.new_tokens, ctxs[m.name])
                if i:
                    singles[m.name].append(t)
        switches: dict[str, list[tuple[float, float, float]]] = {m.name: [] for m in methods}
        for target in fresh_preferences(lam2, lam, rounds):
            for m in methods:
                ctx, overhead = m.prepare(target, 1)
                first = _generate_timed(m.model, single, 2, ctx).first_token_s
                again = _generate_timed(m.model, single, 2, ctx).first_token_s  # nothing changed
                switches[m.name].append((overhead + first, overhead, again))
        ref = methods[0].name  # the backbone, when methods are paired
        paired = {  # per round, against the run just before it (drift hits both alike)
            m.name: {
                "decode": [a.tokens_per_s / b.tokens_per_s for a, b in zip(singles[m.name], singles[ref])],
                "switch": [a / b for (a, *_), (b, *_) in zip(switches[m.name], switches[ref])],
            }
            for m in methods[1:]
        }
        for m in methods:
            with RssPeak() as mem:  # the batch dominates the peak
                ctx, _ = m.prepare(lam, cfg.batch)
                b = median_timing(
                    partial(_generate_timed, m.model, batched, cfg.new_tokens, ctx), cfg.repeats
                )
            s = median_of(singles[m.name])
            res = MethodResult(
                m.name,
                s.tokens_per_s,
                b.tokens_per_s,
                s.first_token_s,
                statistics.median(x for x, _, _ in switches[m.name]),
                statistics.median(o for _, o, _ in switches[m.name]),
                mem.peak / 2**20,
                m.weight_mib,
                note=m.note,
                paired=paired.get(m.name),
                unchanged_first_token_s=statistics.median(a for _, _, a in switches[m.name]),
                switch_cost=median_interval([x / a for x, _, a in switches[m.name]]),
            )
            finish(m.name, res, m.extra_bytes)

    backbone = _Method("backbone", bare, lambda target, batch: (nullcontext, 0.0), backbone_bytes / 2**20)
    result.params["roofline_tok_s"] = roof

    if "hoe" in cfg.methods:

        def route(target, batch):
            t0 = time.perf_counter()
            w = hoe.anchor_weights([target] * batch)
            return partial(hoe.routing, anchor_weights=w), time.perf_counter() - t0

        active = hoe.anchor_weights([lam])[0].numpy() > 0
        measure(  # interleaved with the backbone: HoE's targets are ratios to it
            backbone,
            _Method(
                "hoe",
                hoe.model,
                route,
                (backbone_bytes + _all_bytes(hoe)) / 2**20,
                _live_bytes(hoe, active),
                note=f"active anchors {[n for n, a in zip(_anchor_names(hoe), active) if a]}",
            ),
        )
    else:
        measure(backbone)

    if "mod" in cfg.methods:
        n_models = int((lam > 0).sum())
        with RssPeak() as mem:
            s = median_timing(
                partial(_mod_timed, hoe, tok, [BENCH_PROMPTS[0]], lam, cfg.new_tokens), cfg.repeats
            )
            b = median_timing(partial(_mod_timed, hoe, tok, batch_prompts, lam, cfg.new_tokens), cfg.repeats)
            switch = statistics.median(
                _mod_timed(hoe, tok, [BENCH_PROMPTS[0]], target, 2).first_token_s
                for target in [lam2, lam] * cfg.repeats
            )
        experts_bytes = sum(_expert_bytes(hoe, e) for e in singles)
        res = MethodResult(
            "mod",
            s.tokens_per_s,
            b.tokens_per_s,
            s.first_token_s,
            switch,
            0.0,
            mem.peak / 2**20,
            (backbone_bytes + experts_bytes) / 2**20,
            note=f"{n_models} forwards per token (shared backbone, own KV caches)",
        )
        finish("mod", res, (n_models - 1) * backbone_bytes + experts_bytes)

    factors = merge_baseline.single_factors(hoe, loaded.experts)
    if "rs" in cfg.methods and precision in ("int8", "nf4"):
        result.methods["rs"] = MethodResult(
            "rs", note="quantised weights: a re-merge needs dequantise + requantise; not run"
        )
    elif "rs" in cfg.methods:
        rs_model = load_backbone(
            loaded.manifest.backbone["spec"], precision, cfg.device, base_dir=loaded.root
        ).model
        soup = MergedSoup(rs_model, factors)
        measure(
            _Method(
                "rs",
                rs_model,
                lambda target, batch: (nullcontext, soup.set_preference(target)),
                (weight_bytes(rs_model) + soup.stored_bytes()) / 2**20,
                note="weights re-merged per lambda into a dedicated backbone copy (+ the pre-trained weights kept)",
            )
        )
        del soup, rs_model
        gc.collect()

    for name in [m for m in cfg.methods if m.startswith("merge-")]:
        kind = name.split("-", 1)[1]
        merger = merge_baseline.MergeAtPreference(
            factors, kind, device, **({"density": 0.5} if kind == "ties" else {})
        )

        def merged(target, batch, merger=merger):
            t0 = time.perf_counter()
            deltas = merger.deltas(target)
            return partial(merge_baseline.use_deltas, hoe, deltas), time.perf_counter() - t0

        dense = sum(d.numel() * d.element_size() for d in merger.deltas(lam).values())
        measure(  # (the forward hooks stay installed: merge runs after HoE)
            _Method(
                name,
                hoe.model,
                merged,
                (backbone_bytes + dense) / 2**20,
                dense,
                note="merged dense delta per lambda, added by a forward hook (as the evaluation runs it)",
            )
        )
        del merger
        gc.collect()
    return result  # the three backbones go with this frame


def fresh_preferences(lam2: np.ndarray, lam: np.ndarray, rounds: int, step: float = 1e-3) -> list:
    """``rounds`` pairs (near lambda2, near lambda), every one a preference not used before:
    round i moves each a fraction ``step * (i + 1)`` of the way towards the other. So HoE
    builds its per-preference kernels anew on every change (what a slider move costs), as RS
    and merge-at-lambda re-merge. The live anchors stay the same from round to round (their
    stacked factors, cached per active set, are what a first visit to a region adds)."""
    out = []
    for i in range(rounds):
        t = step * (i + 1)
        out += [(1 - t) * lam2 + t * lam, (1 - t) * lam + t * lam2]
    return out


def _anchor_names(hoe) -> list[str]:
    return [*hoe.expert_names, *(r.name for r in hoe.routers)]


def _expert_bytes(hoe, expert: int, element_size: int | None = None) -> int:
    """Bytes of one expert's factors across the HoE layers (``element_size`` bytes each;
    default: as stored)."""
    total = 0
    for layer in hoe.layers.values():
        rows = int((layer.owner == expert).sum())
        total += (
            rows
            * (layer.lora_A.shape[1] + layer.lora_B.shape[0])
            * (element_size or layer.lora_A.element_size())
        )
    return total


def decode_element_size(hoe) -> int:
    """Bytes per factor and gate weight that a single-stream decode step reads: the compiled
    CPU step keeps float32 ones that hold float16 values (the shipped bundles store float16)
    as float16 (:meth:`hoe_core.routing.fused_cpu.Factors.pack`); else as stored."""
    layers = list(hoe.layers.values())
    stored = layers[0].lora_A
    if stored.device.type != "cpu" or stored.dtype not in fused_cpu.DTYPES or not fused_cpu.available():
        return stored.element_size()
    tensors = [t for layer in layers for t in (layer.lora_A, layer.lora_B, *(g.weight for g in layer.gates))]
    return 2 if all(map(fused_cpu.exact_in_half, tensors)) else stored.element_size()


def _all_bytes(hoe) -> int:
    return sum(weight_bytes(layer) - weight_bytes(layer.base) for layer in hoe.layers.values())


def prefill_flops(hoe, bare: torch.nn.Module, anchor_weights: np.ndarray, n_tokens: int) -> dict:
    """Multiply-adds of one prefill of ``n_tokens`` (batch 1): the bare backbone's linear
    layers, and what HoE's live experts and routers add at one preference.

    The backbone counts every linear layer per token except the output embedding, which
    runs once (``generate`` keeps the last position's logits); attention scores (1.4% more
    at the bench's 43-token prompt) are left out of both. HoE adds, per layer and token,
    R_live (in + out) for its live rank rows and |S| in for the live routers' gate rows.
    ``ratio`` = (backbone + HoE) / backbone. If HoE's low-rank GEMMs ran at the backbone's
    GEMM rate and cost nothing else, its first token would be at most this much slower than
    the backbone's (less, by the share of the backbone's own time outside its linear layers:
    attention, norms, ``generate``). The first-token target has this as a yardstick.

    Args:
        hoe: the HoE model; bare: the same backbone without experts.
        anchor_weights: (K,) one preference's anchor weights (:meth:`anchor_weights`).
    """
    head = bare.get_output_embeddings()
    per_token = once = 0
    for module in bare.modules():
        if hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight"):
            macs = module.in_features * module.out_features
            if module is head:
                once += macs
            else:
                per_token += macs
    active = np.asarray(anchor_weights, float) > 0
    routers = np.flatnonzero(active[hoe.n_experts :])
    extra = 0
    for layer in hoe.layers.values():
        rows = sum(int((layer.owner == e).sum()) for e in _live_experts(active, hoe.n_experts, layer.subsets))
        if rows:
            gate_rows = sum(len(layer.subsets[p]) for p in routers)
            extra += rows * (layer.in_features + layer.out_features) + gate_rows * layer.in_features
    backbone = n_tokens * per_token + once
    return {"backbone": backbone, "hoe": n_tokens * extra, "ratio": (backbone + n_tokens * extra) / backbone}


def _live_experts(active_anchors: np.ndarray, n_experts: int, subsets: list[list[int]]) -> set[int]:
    """Experts live at one preference: its expert anchors with weight, and every expert of
    its routers with weight (``subsets``: each router's experts, as a layer holds them).
    ``active_anchors`` (K,) bool, K = experts then routers."""
    live = set(np.flatnonzero(active_anchors[:n_experts]).tolist())
    for p in np.flatnonzero(active_anchors[n_experts:]):
        live |= set(subsets[p])
    return live


def _live_bytes(hoe, active_anchors: np.ndarray) -> int:
    """Bytes a decode step reads for the live experts' factors and routers' gates of one
    preference, in the format it reads them (:func:`decode_element_size`; gate biases as
    stored). Not counted: the compiled step's small float32 gating maps (per sibling group
    (S, R) and (R,); about 0.5 MiB per token for the shipped bundle)."""
    n = hoe.n_experts
    size = decode_element_size(hoe)
    total = sum(
        layer.gates[p].weight.numel() * size + layer.gates[p].bias.nbytes
        for p in np.flatnonzero(active_anchors[n:])
        for layer in hoe.layers.values()
    )
    live = _live_experts(active_anchors, n, next(iter(hoe.layers.values())).subsets)
    return total + sum(_expert_bytes(hoe, e, size) for e in live)


# ---------------------------------------------------------------------------- the whole run
#: CPU flags that move the ratios: bitsandbytes' 4-bit kernel and bfloat16 GEMMs run several
#: times faster with bfloat16 units (avx512_bf16, amx_bf16) than without
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def machine_info() -> dict:
    import transformers

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "cpu" not in info:
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["cpu_features"] = [f for f in CPU_FEATURES if f in flags]
                break
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def _bench_precision_or_error(cfg: BenchConfig, precision: str, bandwidth_gbs: float, log) -> PrecisionResult:
    """:func:`bench_precision`, with a precision this machine cannot run (no int8 kernel,
    say) reported as an error rather than ending the run."""
    try:
        return bench_precision(cfg, precision, bandwidth_gbs, log)
    except (ImportError, RuntimeError, NotImplementedError) as err:
        log(f"  {precision}: not run ({type(err).__name__}: {err})")
        return PrecisionResult(precision, error=f"{type(err).__name__}: {err}")


def _in_fresh_process(cfg: BenchConfig, precision: str, bandwidth_gbs: float, log) -> PrecisionResult:
    """One precision in a new (spawned) Python process, so nothing an earlier precision's
    methods left behind -- allocator state after merge-at-lambda's dense deltas, RS's
    backbone copy, compiled kernels -- is measured with it. The app runs one precision per
    process; so does this.

    The child never outlives this call: it is killed when the call ends in any way (Ctrl-C
    included), and on Linux when this process dies (``PR_SET_PDEATHSIG``), so no orphan keeps
    measuring beside a later run. An exception in the child is raised here, with the
    child's traceback as a note; a child that dies gives an error entry."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_child_main, args=(send, cfg, precision, bandwidth_gbs, log), name=f"bench-{precision}"
    )
    child.start()
    send.close()  # the child holds the only sending end: its death ends recv() with EOFError
    try:
        try:
            status, payload, trace = receive.recv()
        except EOFError:  # killed (out of memory?) or crashed in native code
            child.join()
            why = f"the process measuring it died (exit code {child.exitcode})"
            log(f"  {precision}: {why}")
            return PrecisionResult(precision, error=why, pid=None)
        child.join()
        if status == "error":
            payload.add_note(f"raised in the bench's child process for {precision}:\n{trace}")
            raise payload
        return payload
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
            child.join()


def _child_main(send, cfg: BenchConfig, precision: str, bandwidth_gbs: float, log) -> None:
    """The child of :func:`_in_fresh_process`: measure, send ("ok", result, "") or ("error",
    exception, traceback) back."""
    import traceback

    if sys.platform.startswith("linux"):  # die with the parent, whatever kills it
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    try:
        message = ("ok", _bench_precision_or_error(cfg, precision, bandwidth_gbs, log), "")
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        message = ("error", err, traceback.format_exc())
    try:
        send.send(message)
    except Exception as err:  # an exception that does not pickle: its text instead
        send.send(("error", RuntimeError(f"{message[1]!r} (unpicklable: {err})"), message[2]))
    send.close()


def progress(*args) -> None:
    """The default ``log``: print, flushed at once (child processes write to a pipe or a file)."""
    print(*args, flush=True)


def run_bench(cfg: BenchConfig, log=progress) -> dict:
    """All precisions, each in a fresh process unless ``cfg.isolate`` is off; returns the
    results dict (see :func:`markdown_report`).

    ``log`` receives progress lines; with ``isolate`` it is sent to the child processes, so
    it must pickle (``print``, a module-level function, a ``functools.partial`` of one).
    The children are spawned: a script that calls this with ``isolate`` needs the usual
    ``if __name__ == "__main__":`` guard (``python -m hoe_core bench`` needs none: spawn
    does not re-run a package's ``__main__``)."""
    from multiprocessing.reduction import ForkingPickler

    from hoe_core.bundle import provenance

    if cfg.isolate:
        try:  # as the process pool will send it (our own objects only; nothing is loaded)
            ForkingPickler.dumps(log)
        except Exception as err:  # PicklingError, AttributeError or TypeError, by object
            raise ValueError(
                "with isolate=True each precision runs in a child process, so log must pickle "
                f"(print, a module-level function or a partial of one); got {log!r}: {err}"
            ) from None
    prov = provenance()  # the code measured: taken before the run, whatever is checked out after
    start = time.perf_counter()
    bandwidth = memory_bandwidth(cfg.bandwidth_mib)
    log(f"memory bandwidth (copy): {bandwidth:.1f} GB/s")
    run_one = _in_fresh_process if cfg.isolate else _bench_precision_or_error
    results = []
    for precision in cfg.precisions:
        log(f"precision {precision}" + (" (fresh process)" if cfg.isolate else ""))
        results.append(run_one(cfg, precision, bandwidth, log))
        gc.collect()
    return {
        "config": asdict(cfg),
        "machine": machine_info(),
        "code": {"git_commit": prov["git_commit"], "git_dirty": prov["git_dirty"]},
        "bandwidth_gbs": bandwidth,
        "seconds": round(time.perf_counter() - start, 1),
        "precisions": [
            {
                "precision": r.precision,
                "error": r.error,
                "pid": r.pid,
                "params": r.params,
                "methods": {k: asdict(v) for k, v in r.methods.items()},
            }
            for r in results
        ],
        "targets": targets(results),
    }


def targets(results: Sequence[PrecisionResult]) -> list[dict]:
    """The issue's targets per precision, each a ratio of two figures of the same run."""
    out = []
    for r in results:
        m = r.methods
        base, hoe = m.get("backbone"), m.get("hoe")
        if r.error or base is None or hoe is None or hoe.single_tok_s is None:
            continue

        def add(name, value, goal, higher=True, r=r, paired=None, flop_ratio=None):
            ok = value >= goal if higher else value <= goal
            out.append(
                {"precision": r.precision, "target": name, "value": value, "goal": goal, "met": bool(ok)}
                | ({"paired": median_interval(paired)} if paired else {})
                | ({"flop_ratio": flop_ratio} if flop_ratio else {})
            )

        rounds = hoe.paired or {}
        add(
            "HoE / backbone decode tok/s (single stream)",
            hoe.single_tok_s / base.single_tok_s,
            0.90,
            paired=rounds.get("decode"),
        )
        if m.get("mod") and m["mod"].single_tok_s:
            add("HoE / MOD decode tok/s (single stream)", hoe.single_tok_s / m["mod"].single_tok_s, 2.5)
        add(  # the backbone's first token in the same interleaved rounds (same prompt, same call)
            "HoE preference change -> first token / backbone first token",
            hoe.switch_first_token_s / base.switch_first_token_s,
            1.1,
            higher=False,
            paired=rounds.get("switch"),
            flop_ratio=r.params.get("prefill_flop_ratio"),
        )
        p = r.params
        if p.get("backbone"):
            add(
                "(experts + routers) / backbone parameters",
                (p["experts"] + p["routers"]) / p["backbone"],
                0.20,
                higher=False,
            )
    return out


MIN_INTERVAL_SAMPLES = 5  # fewer per-run ratios than this get a median but no interval


def median_interval(values: Sequence[float], level: float = 0.9, resamples: int = 2000) -> dict:
    """The median of per-round ratios and a percentile-bootstrap ``level`` interval for it
    (seeded: the same rounds give the same interval). How far a ratio of this run can be
    trusted on a noisy machine: a target whose interval straddles the goal is within noise.
    Below :data:`MIN_INTERVAL_SAMPLES` ratios no interval is given (low, high None): a
    bootstrap of one or two values would look like certainty."""
    v = np.asarray(values, float)
    out = {"median": float(np.median(v)), "low": None, "high": None, "level": level, "n": v.size}
    if v.size >= MIN_INTERVAL_SAMPLES:
        medians = np.median(np.random.default_rng(0).choice(v, (resamples, v.size)), axis=1)
        out["low"], out["high"] = (float(q) for q in np.quantile(medians, [(1 - level) / 2, (1 + level) / 2]))
    return out


# ---------------------------------------------------------------------------- the report
def _fmt(value, spec: str = ".1f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _code_line(code: dict) -> str:
    commit = code.get("git_commit")
    if not commit:
        return "Code: not a git checkout.  "
    state = {True: "uncommitted changes in hoe_core/ or configs/", False: "clean tree"}.get(
        code.get("git_dirty"), "state unknown"
    )
    return f"Code: commit {commit[:10]} ({state}).  "


def markdown_report(results: dict, command: str) -> str:
    """``bench/results.md``: machine, command, one table per precision, the targets."""
    m = results["machine"]
    lines = [
        "# HoE benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m.get('cpu', m['machine'])}, {m['cpus']} CPUs ({m['torch_threads']} torch threads), "
        f"{m.get('memory_gib', '?')} GiB, {m['platform']}; torch {m['torch']}, transformers {m['transformers']}"
        + (
            f"; CPU features {' '.join(m['cpu_features']) or 'none of ' + ' '.join(CPU_FEATURES)}"
            if "cpu_features" in m
            else ""
        )
        + (f" (torch kernels: {m['torch_cpu_capability']})" if m.get("torch_cpu_capability") else "")
        + (f"; GPU {m['cuda']}" if m.get("cuda") else "")
        + ".  ",
        _code_line(results.get("code") or {}),
        f"Memory bandwidth (tensor copy): {results['bandwidth_gbs']:.1f} GB/s. "
        f"Run took {results['seconds']:.0f} s.  ",
        f"Settings: {results['config']['new_tokens']} new tokens (greedy, EOS suppressed), batch "
        f"{results['config']['batch']}, preference {list(results['config']['preference'])} "
        f"(switch to {list(results['config']['switch_to'])}); medians of {results['config']['repeats']} runs after "
        f"a warm-up (backbone and HoE: {results['config'].get('pair_repeats', results['config']['repeats'])} "
        "rounds, interleaved run by run); ratios are within this one run"
        + (
            ", and within one precision: each precision ran in a fresh process."
            if results["config"].get("isolate")
            else "; all precisions ran in one process, one after another."
        ),
        "",
    ]
    for p in results["precisions"]:
        lines += [f"## {p['precision']}", ""]
        if p["error"]:
            lines += [f"Not run: {p['error']}", ""]
            continue
        base = p["methods"].get("backbone", {})
        lines += [
            "| method | decode tok/s (1) | vs backbone | tok/s (batch) | first token s | pref. change → first token s "
            "| of which re-merge / routing s | peak RSS MiB | weights MiB | roofline fraction | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in p["methods"].items():
            rel = (
                r["single_tok_s"] / base["single_tok_s"]
                if r.get("single_tok_s") and base.get("single_tok_s")
                else None
            )
            lines.append(
                f"| {name} | {_fmt(r['single_tok_s'])} | {_fmt(rel, '.2f')} | {_fmt(r['batch_tok_s'])} "
                f"| {_fmt(r['first_token_s'], '.3f')} | {_fmt(r['switch_first_token_s'], '.3f')} "
                f"| {_fmt(r['switch_overhead_s'], '.3f')} | {_fmt(r['peak_rss_mib'], '.0f')} "
                f"| {_fmt(r['weight_mib'], '.0f')} | {_fmt(r['roofline_fraction'], '.2f')} | {r['note']} |"
            )
        q = p["params"]
        if q:
            lines += [
                "",
                f"Parameters: backbone {q['backbone']:,}; HoE experts {q['experts']:,} + routers {q['routers']:,} "
                f"= {(q['experts'] + q['routers']) / q['backbone']:.1%} of the backbone. RS and MOD keep the "
                f"{q['single_experts']:,} parameters of the single experts here (as factors on the shared "
                f"backbone); as full models, as their papers run them, {q['n_full_models']:,}. Roofline: "
                f"{q['roofline_tok_s']:.1f} tok/s if every weight byte is read once per token.{_byte_bound(p)}",
            ]
        lines.append("")
    lines += [
        "## Targets",
        "",
        "Measured: the ratio of the two medians. Paired: the median of the per-run ratios (each HoE "
        "run over the backbone run just before it; n runs: one per round for decode, two per round "
        "for the first token, after a change to each preference) with a bootstrap interval, to show "
        "how far the measured ratio can be trusted on this machine. FLOP ratio (first token): "
        "HoE's prefill multiply-adds over the backbone's at the bench prompt "
        "(`hoe_core.bench.prefill_flops`, the mean over the two preferences). Were HoE's "
        "low-rank GEMMs as fast per multiply-add as the backbone's, and cost nothing else, its "
        "first token would be at most this much slower than the backbone's.",
        "",
        "| precision | target | measured | paired: median [interval] | FLOP ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        op = "≥" if "parameters" not in t["target"] and "first token" not in t["target"] else "≤"
        lines.append(
            f"| {t['precision']} | {t['target']} | {t['value']:.2f} | {_interval(t.get('paired'))} "
            f"| {_fmt(t.get('flop_ratio'), '.2f')} | {op} {t['goal']} | {'yes' if t['met'] else 'no'} |"
        )
    lines += [
        "",
        "## Preference switch cost",
        "",
        "What a preference change itself costs: the first token right after it (from routing or "
        "re-merging on) over the same call again at the unchanged preference, per run. The "
        "backbone, which has no preference, shows what a second identical call gains anyway.",
        "",
        "| precision | method | after a change s | unchanged s | ratio: median [interval] |",
        "|---|---|---|---|---|",
    ]
    for p in results["precisions"]:
        for name, r in p["methods"].items():
            if r.get("switch_cost"):
                lines.append(
                    f"| {p['precision']} | {name} | {_fmt(r['switch_first_token_s'], '.3f')} "
                    f"| {_fmt(r['unchanged_first_token_s'], '.3f')} | {_interval(r['switch_cost'])} |"
                )
    return "\n".join(lines) + "\n"


def _byte_bound(p: dict) -> str:
    """A sentence: what HoE's decode step reads beyond the backbone, and the speed ratio to
    the backbone that this leaves at the roofline (both reading at the copy bandwidth)."""
    methods = p.get("methods") or {}
    bytes_of = {k: (methods.get(k) or {}).get("bytes_per_token_mib") for k in ("backbone", "hoe")}
    if None in bytes_of.values():
        return ""
    extra = bytes_of["hoe"] - bytes_of["backbone"]
    return (
        f" HoE's decode step reads {extra:.1f} MiB of live experts and routers per token beyond the "
        f"backbone's {bytes_of['backbone']:.1f} MiB: at the roofline it could decode at most "
        f"{bytes_of['backbone'] / bytes_of['hoe']:.3f}x as fast as the backbone."
    )


def _interval(q: dict | None) -> str:
    """A :func:`median_interval` as "median [low, high] (level, n)"."""
    if not q:
        return "–"
    if q["low"] is None:
        return f"{q['median']:.2f} (n={q['n']}: too few for an interval)"
    return f"{q['median']:.2f} [{q['low']:.2f}, {q['high']:.2f}] ({q['level']:.0%}, n={q['n']})"
