"""Command line: ``python -m hoe_core <command>``. Parsing and validation only; the work
is done by the library functions it calls.

Contract (other tools rely on it):
    python -m hoe_core generate --bundle DIR --prompt TEXT --preference 0.2,0.5,0.3
        [--max-new-tokens N] [--seed S] [--precision P] [--json]
prints, with --json, one JSON object with at least ``text``, ``preference`` (normalised)
and ``objectives`` (and ``notes``: what was done to the prompt, e.g. cut to 4,000
characters; also printed to stderr). Bad input exits with code 2 and ``error: ...`` naming
the field and its allowed range.

    python -m hoe_core evaluate --bundle DIR --methods hoe,rs,mod,... --prompts FILE
        --grid G [--max-new-tokens N] [--batch-size B] --out OUT.csv
writes OUT.csv (method, prompt_id, w_<obj>..., r_<obj>..., text; greedy, so two runs give
identical files), OUT.summary.json and OUT.summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hoe_core.config import APP_PRECISION, PRECISIONS


def _floats(text: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 0.2,0.5,0.3, got {text!r}"
        ) from None


def _ranks(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(",") if p)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ranks must look like q_proj=8,down_proj=16, got {text!r}"
        ) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from hoe_core.bundle import load_bundle, read_manifest
    from hoe_core.config import DecodingConfig
    from hoe_core.generation import check_prompt, generate
    from hoe_core.routing.preference import normalize_preference

    manifest = read_manifest(args.bundle)
    preference = normalize_preference(args.preference, len(manifest.objectives))
    prompt, notes = check_prompt(args.prompt)
    for note in notes:  # e.g. the prompt was cut: say so, on stderr (stdout stays JSON)
        print(f"note: {note}", file=sys.stderr)
    defaults = manifest.decoding_config
    decoding = DecodingConfig(
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else defaults.max_new_tokens,
        temperature=args.temperature if args.temperature is not None else defaults.temperature,
        top_p=args.top_p if args.top_p is not None else defaults.top_p,
        repetition_penalty=args.repetition_penalty
        if args.repetition_penalty is not None
        else defaults.repetition_penalty,
        seed=args.seed,
    )
    loaded = load_bundle(args.bundle, precision=args.precision, device=args.device)
    result = generate(loaded.hoe, loaded.backbone.tokenizer, [prompt], [preference], decoding)[0]
    names = loaded.hoe.expert_names + [r.name for r in loaded.hoe.routers]
    payload = {
        "text": result.text,
        "preference": dict(zip(manifest.objectives, result.preference)),
        "objectives": manifest.objectives,
        "anchor_weights": {n: w for n, w in zip(names, result.anchor_weights) if w > 0},
        "new_tokens": result.new_tokens,
        "seconds": round(result.seconds, 3),
        "bundle": str(args.bundle),
        "precision": args.precision,
        "decoding": asdict(decoding),
        "notes": notes,
    }
    if args.json:
        print(json.dumps(payload, ensure_ascii=False))
    else:
        pref = ", ".join(f"{k}={v:.2f}" for k, v in payload["preference"].items())
        print(f"[{pref}] ({result.new_tokens} tokens, {result.seconds:.1f} s)\n{result.text}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from hoe_core.bundle import verify_bundle

    m = verify_bundle(args.bundle)
    print(f"bundle {m.name!r}: OK ({len(m.files)} files verified)")
    print(f"  backbone   {m.backbone['spec']} (fingerprint {m.backbone['fingerprint']})")
    print(f"  objectives {', '.join(m.objectives)}")
    for e in m.experts:
        print(f"  expert     {e.name:<16} anchor {e.anchor}")
    for r in m.routers:
        print(f"  router     {r.name:<16} anchor {r.anchor} over {r.experts}")
    return 0


def cmd_task_svd(args: argparse.Namespace) -> int:
    from hoe_core.config import TaskSVDConfig
    from hoe_core.experts.build import objective_vector, write_expert

    tau = objective_vector(base=args.base, tuned=args.tuned, adapter=args.adapter)
    cfg = TaskSVDConfig(
        rank=args.rank, ranks=args.ranks or {}, energy=args.energy, density=args.density, rescale=args.rescale
    )
    summary = write_expert(tau, cfg, args.out, base_model=args.base or "")
    print(json.dumps(summary, indent=2))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from hoe_core.config import TaskSVDConfig
    from hoe_core.experts.build import merged_objective_vector, objective_vector, write_expert
    from hoe_core.routing.preference import normalize_preference

    if len(args.adapters) < 2:
        raise ValueError("--adapters needs at least two adapter folders, comma-separated")
    anchor = normalize_preference(args.anchor, len(args.adapters))
    params = json.loads(args.params) if args.params else {}
    if not isinstance(params, dict):
        raise ValueError("--params must be a JSON object, e.g. '{\"density\": 0.3}'")
    taus = [objective_vector(adapter=a) for a in args.adapters]
    try:
        tau = merged_objective_vector(taus, anchor.tolist(), args.method, **params)
    except TypeError as err:
        raise ValueError(f"--params not accepted by merge method {args.method!r}: {err}") from None
    cfg = TaskSVDConfig(rank=args.rank, energy=args.energy)
    summary = write_expert(tau, cfg, args.out)
    print(json.dumps({"anchor": anchor.tolist(), "method": args.method, **summary}, indent=2))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from hoe_core.training.recipe import build
    from hoe_core.training.recipe_config import load_recipe

    cfg = load_recipe(args.recipe)
    out = args.out or Path("assets") / cfg.name
    build(cfg, out, work_dir=args.work_dir, command=["python", "-m", "hoe_core", *sys.argv[1:]])
    print(f"bundle written to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hoe_core.evaluation.run import evaluate_bundle
    from hoe_core.evaluation.summary import markdown_table

    summary = evaluate_bundle(
        args.bundle,
        [m for m in args.methods.split(",") if m.strip()],
        args.prompts,
        args.grid,
        args.out,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        reference=args.reference,
    )
    print(markdown_table(summary, summary["timing"]), end="")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.summary.json')}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from hoe_core.bench import BenchConfig, markdown_report, run_bench, write_report

    cfg = BenchConfig(
        bundle=str(args.bundle),
        precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        new_tokens=args.new_tokens,
        batch=args.batch,
        repeats=args.repeats,
        pair_repeats=args.pair_repeats,
        device=args.device,
        isolate=not args.same_process,
    )
    results = run_bench(cfg)
    command = " ".join(["python -m hoe_core", *sys.argv[1:]]) if args.command is None else args.command
    write_report(markdown_report(results, command), args.md)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_pico_bundle(args: argparse.Namespace) -> int:
    from hoe_core.pico import build_pico_bundle

    out = build_pico_bundle(args.out, seed=args.seed)
    print(f"pico bundle written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hoe_core",
        description="HoE: multi-objective LLM alignment with hierarchical experts.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    g = sub.add_parser("generate", help="generate one answer at a preference")
    g.add_argument("--bundle", required=True, type=Path, help="bundle folder")
    g.add_argument("--prompt", required=True, help="the user's message")
    g.add_argument(
        "--preference",
        required=True,
        type=_floats,
        help="one weight per objective, e.g. 0.2,0.5,0.3 (normalised to sum 1)",
    )
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: the bundle's")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the bundle's)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", choices=PRECISIONS, default="fp32")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", help="check a bundle's manifest and checksums")
    v.add_argument("--bundle", required=True, type=Path)
    v.set_defaults(func=cmd_verify)

    t = sub.add_parser("task-svd", help="objective vector -> LoRA expert by truncated SVD")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--tuned", help="fully fine-tuned HF folder (tau = W_tuned - W_base)")
    src.add_argument("--adapter", help="peft LoRA adapter folder (tau = s B A)")
    t.add_argument("--base", help="the backbone (folder or packaged:NAME); needed with --tuned")
    t.add_argument("--out", required=True, type=Path, help="output peft adapter folder")
    t.add_argument("--rank", type=int, default=16, help="rank for every module type")
    t.add_argument("--ranks", type=_ranks, help="per module type, e.g. q_proj=8,down_proj=32")
    t.add_argument("--energy", type=float, help="keep this fraction of sum(sigma^2)")
    t.add_argument("--density", type=float, help="magnitude-prune to this density first")
    t.add_argument("--rescale", action="store_true", help="restore the Frobenius norm")
    t.set_defaults(func=cmd_task_svd)

    m = sub.add_parser("merge", help="merged multi-objective LoRA expert at an anchor preference")
    m.add_argument(
        "--adapters",
        required=True,
        type=lambda s: [p for p in s.split(",") if p],
        help="comma-separated peft LoRA folders, one per objective",
    )
    m.add_argument("--anchor", required=True, type=_floats, help="weights, one per adapter")
    m.add_argument("--method", default="ta", choices=["ta", "ties", "dare", "pcb"])
    m.add_argument("--params", default=None, help="method parameters as JSON, e.g. '{\"density\": 0.3}'")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--rank", type=int, default=16)
    m.add_argument("--energy", type=float, default=None)
    m.set_defaults(func=cmd_merge)

    b = sub.add_parser(
        "build", help="run a build recipe (sample, DPO experts, task-SVD, merge, routers) -> bundle"
    )
    b.add_argument("--recipe", required=True, type=Path, help="configs/<name>.yaml")
    b.add_argument("--out", type=Path, default=None, help="bundle folder (default: assets/<name>)")
    b.add_argument(
        "--work-dir", type=Path, default=None, help="resumable step outputs (default: build-cache/<name>)"
    )
    b.set_defaults(func=cmd_build)

    e = sub.add_parser("evaluate", help="methods x preference grid x prompts -> CSV + summary")
    e.add_argument("--bundle", required=True, type=Path)
    e.add_argument(
        "--methods", required=True, help="comma-separated: hoe,rs,mod,merge-ta,merge-ties,base,experts"
    )
    e.add_argument("--prompts", required=True, type=Path, help="a text file, one prompt per line")
    e.add_argument("--grid", required=True, type=int, help="points per simplex edge (11 -> 0, 0.1, ..., 1)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: the bundle's")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--out", required=True, type=Path, help="OUT.csv (+ OUT.summary.json / .md)")
    e.add_argument("--precision", choices=PRECISIONS, default=APP_PRECISION, help="default: the app's")
    e.add_argument("--device", default=None)
    e.add_argument("--reference", type=_floats, default=None, help="hypervolume reference (default -1 each)")
    e.set_defaults(func=cmd_evaluate)

    k = sub.add_parser("bench", help="speed and memory: HoE vs the backbone, MOD, RS, merge, per precision")
    k.add_argument("--bundle", type=Path, default=Path("assets/smollm2-hhh"))
    k.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    k.add_argument("--md", type=Path, default=Path("bench/results.md"), help="markdown report")
    k.add_argument(
        "--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,bf16,int8,nf4"
    )
    k.add_argument(
        "--methods",
        default="hoe,mod,rs,merge-ties",
        help="besides the backbone: hoe,mod,rs,merge-ties,merge-ta",
    )
    k.add_argument("--new-tokens", type=int, default=32)
    k.add_argument("--batch", type=int, default=8)
    k.add_argument("--repeats", type=int, default=3)
    k.add_argument(
        "--pair-repeats", type=int, default=15, help="interleaved backbone/HoE rounds (single stream, switch)"
    )
    k.add_argument("--device", default="cpu")
    k.add_argument(
        "--same-process",
        action="store_true",
        help="run every precision in this one process (default: each in a fresh one, so no "
        "precision measures what the previous one's baselines left behind)",
    )
    k.add_argument("--command", default=None, help=argparse.SUPPRESS)
    k.set_defaults(func=cmd_bench)

    p = sub.add_parser("pico-bundle", help="write a tiny random bundle (for tests and app dev)")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_pico_bundle)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
