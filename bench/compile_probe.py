"""Does a static KV cache, or ``torch.compile`` of the whole model, speed up CPU decoding?

Issue 6 asks to try ``torch.compile`` and a static cache and keep what measurably helps.
Compiling HoE's group kernel alone was slower (bench/README.md, "What was tried and not kept"); this
tries the whole forward of the bare backbone, where compiling has the best case: no HoE
layer, so no numba call or context variable to break the graph. Arms, decoded in shuffled
order round after round (greedy, a fixed number of tokens), in one process:

- ``eager``: the backbone as the bench runs it (dynamic cache);
- ``static``: the same with ``cache_implementation="static"``;
- ``static + compile``: the static cache and ``torch.compile(model.forward)`` (inductor,
  ``dynamic=False``; its compile time is reported beside);
- ``hoe`` and ``hoe static``: HoE as served, with each cache;
- ``hoe compiled``: HoE with its mixture as plain torch ops that dynamo can trace (every
  layer's stacked factors and gates and this preference's gating resolved up front, as the
  served kernels hold them; no numba, no context variable), the static cache and
  ``torch.compile`` of the whole forward. The report gives how far its next-token logits at
  the prompt are from the served path's; the ratio to compare is ``static + compile / hoe
  compiled``.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/compile_probe.py [--precision nf4] \
        [--rounds 6] [--out bench/compile_probe-nf4.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack, contextmanager
from functools import partial

BUNDLE = "assets/smollm2-hhh"
PREFERENCE = (0.4, 0.3, 0.3)


@contextmanager
def arm_state(model, forward=None, cache: str | None = None, inner=None):
    """Within the block: ``model.forward`` replaced by ``forward`` (if given), the
    generation config's cache implementation set to ``cache``, and ``inner()`` entered."""
    config = model.generation_config
    old_forward, old_cache = model.__dict__.get("forward"), config.cache_implementation
    if forward is not None:
        model.forward = forward
    config.cache_implementation = cache
    try:
        with ExitStack() as stack:
            if inner is not None:
                stack.enter_context(inner())
            yield
    finally:
        config.cache_implementation = old_cache
        if old_forward is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = old_forward


def resolve_pure_torch(hoe, preference, dtype):
    """A context factory: within it every HoE layer computes ``base(x) + ((A x) * g) B^T``
    with plain torch ops, from tensors resolved here for ``preference`` (batch 1): the
    stacked active A rows and router gates (R + S, in), their bias, the fixed gate part (R,)
    and the routers' maps with their weights folded in (S, R) -- the quantities the served
    kernels hold (:mod:`hoe_core.routing.kernel`)."""
    import torch
    import torch.nn.functional as F

    from hoe_core.routing.context import Routing
    from hoe_core.routing.layer import HoELinear

    routing = Routing(weights=torch.as_tensor(hoe.anchor_weights([preference]), dtype=torch.float32))
    for m in hoe.model.modules():
        if not isinstance(m, HoELinear):
            continue
        plan = routing.plan(1, m.n_experts, m.subsets, torch.device("cpu"))
        act = m._active(plan)
        rows, bias, maps = [act.a], [act.a.new_zeros(act.a.shape[0])], []
        for p, w_p in plan.routers:
            rows.append(m.gates[p].weight.detach())
            bias.append(m.gates[p].bias.detach())
            maps.append(w_p[0, 0, 0] * act.maps[p])
        m.pure = (
            torch.cat(rows).to(dtype).contiguous(),
            torch.cat(bias).to(dtype),
            act.a.shape[0],
            len(plan.routers),
            plan.expert_weights[0, 0][act.owner].float(),
            torch.cat(maps).float() if maps else None,
            act.b_t.to(dtype).contiguous(),
        )

    def forward(self, x):
        weight, bias, n_rank, n_routers, g_fixed, maps, b_t = self.pure
        y = self.base(x)
        h = F.linear(x.to(weight.dtype), weight, bias).float()  # (B, T, R + S)
        g = g_fixed
        if maps is not None:
            probs = torch.softmax(h[..., n_rank:].unflatten(-1, (n_routers, -1)), -1).flatten(-2)
            g = g + probs @ maps  # (B, T, R)
        return y + ((h[..., :n_rank] * g).to(b_t.dtype) @ b_t).to(y.dtype)

    @contextmanager
    def pure():
        served = HoELinear.forward
        HoELinear.forward = forward
        try:
            yield
        finally:
            HoELinear.forward = served

    return pure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="nf4", choices=["fp32", "bf16", "int8", "nf4"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--factors", default="float32", choices=["float32", "bfloat16"], help="hoe compiled's factors"
    )
    ap.add_argument("--out", help="also write the report here (markdown)")
    args = ap.parse_args()

    import torch

    from hoe_core.bench import invocation, load_models, routed_at, shuffled_rounds, write_report

    loaded, bare, enc = load_models(BUNDLE, args.precision)
    hoe = loaded.hoe
    routed = routed_at(hoe, PREFERENCE)
    compiled = torch.compile(bare.forward, dynamic=False)
    pure = resolve_pure_torch(hoe, PREFERENCE, getattr(torch, args.factors))
    hoe_compiled = torch.compile(hoe.model.forward, dynamic=False)

    arms = {
        "eager": (bare, partial(arm_state, bare)),
        "static": (bare, partial(arm_state, bare, cache="static")),
        "static + compile": (bare, partial(arm_state, bare, compiled, "static")),
        "hoe": (hoe.model, partial(arm_state, hoe.model, inner=routed)),
        "hoe static": (hoe.model, partial(arm_state, hoe.model, cache="static", inner=routed)),
        "hoe compiled": (hoe.model, partial(arm_state, hoe.model, hoe_compiled, "static", inner=pure)),
    }

    def greedy_ids(arm: str) -> torch.Tensor:
        model = arms[arm][0]
        with arms[arm][1](), torch.no_grad():
            return model.generate(
                **enc,
                max_new_tokens=8,
                min_new_tokens=8,
                do_sample=False,
                top_p=None,
                top_k=None,
                temperature=None,
            )

    eager_ids = greedy_ids("eager")
    start = time.perf_counter()
    compiled_ids = greedy_ids("static + compile")  # compiles (prefill and decode shapes)
    compile_s = time.perf_counter() - start
    same = torch.equal(compiled_ids, eager_ids)
    greedy_ids("hoe")  # bitsandbytes packs its CPU weights on the first eager call: before compiling
    with torch.no_grad():
        with routed():
            served_logits = hoe.model(**enc).logits[0, -1]
        with pure():
            pure_logits = hoe.model(**enc).logits[0, -1]
    logits_gap = (pure_logits - served_logits).abs().max().item()
    start = time.perf_counter()
    greedy_ids("hoe compiled")
    hoe_compile_s = time.perf_counter() - start

    ms, first = shuffled_rounds(arms, enc, args.rounds, args.tokens, args.seed)
    med = {k: statistics.median(v) for k, v in ms.items()}
    med_first = {k: statistics.median(v) for k, v in first.items()}
    lines = [
        f"# Static cache and whole-model torch.compile, decode ({args.precision}), one process",
        "",
        f"{invocation()}. torch {torch.__version__}. HoE at preference {PREFERENCE}; "
        f"{args.rounds} rounds x {args.tokens} tokens, arms shuffled per round (round 0 a warm-up). "
        f"Compiling the backbone's forward (first 8-token generation, both shapes): {compile_s:.0f} s; "
        f"its greedy tokens {'equal' if same else 'differ from'} the eager backbone's. "
        f"Compiling HoE's ({args.factors} factors): {hoe_compile_s:.0f} s; its mixture as torch ops, "
        f"eager, gives next-token logits within {logits_gap:.2g} of served HoE's at the prompt.",
        "",
        "| arm | decode ms per token (median) | tokens/s | eager backbone / arm | first token ms |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {v:.2f} | {1e3 / v:.1f} | {med['eager'] / v:.3f} | {med_first[k]:.0f} |"
            for k, v in med.items()
        ),
    ]
    ratio = statistics.median(b / h for b, h in zip(ms["static + compile"], ms["hoe compiled"]))
    lines += ["", f"HoE compiled / backbone compiled, median of per-round ratios: {ratio:.3f}."]
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
