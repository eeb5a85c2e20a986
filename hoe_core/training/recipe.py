"""The build: recipe YAML -> bundle. Each arrow is a resumable step whose output sits in the
work folder (``build-cache/<name>`` by default); a rerun skips what is done.

    samples/ (sample + score)  ->  dpo/<objective>/ (single-objective LoRA, DPO)
      -> task-SVD LoRA experts  ->  merged experts at anchors (method chosen by val hypervolume)
      -> routers/ (Tchebycheff + OMD; linear ablation)  ->  report.json  ->  bundle
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hoe_core.config import DecodingConfig
from hoe_core.evaluation.front import evaluate_grid, hoe_method, mean_front
from hoe_core.evaluation.metrics import hypervolume, mean_ci, simplex_grid
from hoe_core.experts.adapters import load_lora_adapter
from hoe_core.experts.build import compress, merged_objective_vector
from hoe_core.routing.model import HoEModel, LoraExpert
from hoe_core.routing.router import RouterExpert, nearest_experts
from hoe_core.training.experts import train_dpo_expert
from hoe_core.training.recipe_config import RecipeConfig
from hoe_core.training.routers import train_router
from hoe_core.training.sampling import preference_pairs, sample_and_score

HV_REFERENCE = -1.0  # per objective, in normalised reward units (base samples have mean 0, std 1)


def _log(msg: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _prompts(cfg: RecipeConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val, eval) as (id, text) lists."""
    src = cfg.prompts
    if src.source == "inline":
        train = [(f"train-{i}", p) for i, p in enumerate(src.train)]
        val = [(f"val-{i}", p) for i, p in enumerate(src.val)]
        return train, val, val
    if src.source != "assets":
        raise ValueError(f"prompts.source must be 'assets' or 'inline', got {src.source!r}")
    from hoe_core.data.prompts import load_prompts

    def pairs(split: str, cap: int | None) -> list[tuple[str, str]]:
        records = load_prompts(split, Path(src.root))
        if cap and cap < len(records):  # evenly spaced: the files are grouped by source
            keep = np.linspace(0, len(records) - 1, cap).round().astype(int)
            records = [records[i] for i in keep]
        return [(r.id, r.prompt) for r in records]

    return pairs("train", src.max_train), pairs("val", src.max_val), pairs("eval", src.max_val)


def _backbone(cfg: RecipeConfig, work: Path):
    from hoe_core.backbone import load_backbone
    from hoe_core.pico import save_pico_backbone

    if cfg.backbone == "pico":
        folder = work / "backbone"
        if not (folder / "config.json").is_file():
            save_pico_backbone(folder, seed=cfg.seed)
        return load_backbone(str(folder), "fp32", "cpu"), folder
    return load_backbone(cfg.backbone, "fp32"), None


def _vertex(n: int, i: int) -> np.ndarray:
    v = np.zeros(n)
    v[i] = 1.0
    return v


def _evaluate_at(hoe: HoEModel, tok, prompts, grid, cfg: RecipeConfig, rewards, norms, max_new_tokens, name):
    decoding = DecodingConfig(
        **{**asdict(cfg.decoding), "max_new_tokens": max_new_tokens, "temperature": 0.0}
    )
    return evaluate_grid(
        name,
        hoe_method(hoe, tok, decoding),
        prompts,
        grid,
        cfg.objectives,
        rewards,
        norms,
        batch_size=cfg.merge.batch_size,
    )


def build(cfg: RecipeConfig, out_dir: str | Path, work_dir: str | Path | None = None, command=None) -> Path:
    """Run every step of the recipe and write the bundle to ``out_dir``."""
    from hoe_core.bundle import write_bundle
    from hoe_core.rewards import fit_normalizer, get_reward

    start = time.perf_counter()
    work = Path(work_dir or Path("build-cache") / cfg.name)
    work.mkdir(parents=True, exist_ok=True)
    n = len(cfg.objectives)
    timings: dict[str, float] = {}

    def lap(step: str, t0: float) -> None:
        timings[step] = round(time.perf_counter() - t0, 1)
        _log(f"{step}: {timings[step]} s")

    t0 = time.perf_counter()
    bb, pico_folder = _backbone(cfg, work)
    tok = bb.tokenizer
    train, val, evals = _prompts(cfg)
    rewards = {o: get_reward(o, **cfg.reward_params.get(o, {})) for o in cfg.objectives}
    _log(
        f"backbone {bb.spec} ({bb.fingerprint}); {len(train)} train / {len(val)} val / {len(evals)} eval prompts"
    )
    lap("load", t0)

    # 1. sample + score, shared by all objectives
    t0 = time.perf_counter()
    samples = sample_and_score(bb.model, tok, train, rewards, cfg.sampling, work / "samples")
    norms = {o: fit_normalizer(np.array([s.rewards[o] for s in samples])) for o in cfg.objectives}
    lap("sample", t0)

    # 2. single-objective fine-tunes (DPO LoRA), resumable per objective
    t0 = time.perf_counter()
    training = {}
    for o in cfg.objectives:
        adapter = work / "dpo" / o
        if not (adapter / "training.json").is_file():
            _log(f"DPO expert for {o}")
            train_dpo_expert(
                bb.model, tok, preference_pairs(samples, o, cfg.experts.min_gap), cfg.experts, adapter
            )
        training[o] = json.loads((adapter / "training.json").read_text())
    taus = {o: dict(load_lora_adapter(work / "dpo" / o)) for o in cfg.objectives}
    lap("experts", t0)

    # 3. task-SVD -> single-objective LoRA experts at the vertices
    t0 = time.perf_counter()
    experts, expert_info = [], {}
    for i, o in enumerate(cfg.objectives):
        factors, report = compress(taus[o], cfg.task_svd)
        experts.append(LoraExpert(name=o, anchor=_vertex(n, i), factors=factors))
        expert_info[o] = {
            "kind": "single",
            "task_svd": report,
            "dpo": {k: v for k, v in training[o].items() if k != "log"},
        }
    lap("task_svd", t0)

    # 4. merged experts at anchors: one candidate set per method, chosen by val hypervolume
    t0 = time.perf_counter()
    selection = {}
    if cfg.anchors:
        grid = simplex_grid(n, cfg.merge.grid)
        candidates = {}
        for method in cfg.merge.methods:
            merged = []
            for a in cfg.anchors:
                tau = merged_objective_vector(
                    [taus[o] for o in cfg.objectives], list(a), method, **cfg.merge.params.get(method, {})
                )
                factors, report = compress(tau, cfg.task_svd)
                name = "merge-" + "-".join(f"{x:.2f}" for x in a)
                merged.append((LoraExpert(name=name, anchor=np.array(a), factors=factors), report))
            cached = work / "merge" / f"{method}.json"  # delete build-cache/<name>/merge to redo
            if cached.is_file():
                means = np.array(json.loads(cached.read_text())["mean_rewards"])
            else:
                hoe = HoEModel(bb.model, cfg.objectives, experts + [m for m, _ in merged])
                rows = _evaluate_at(
                    hoe, tok, val, grid, cfg, rewards, norms, cfg.merge.max_new_tokens, method
                )
                hoe.detach()
                prefs, means = mean_front(rows, cfg.objectives)
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(
                    json.dumps({"preferences": prefs.tolist(), "mean_rewards": means.tolist()}) + "\n"
                )
            selection[method] = hypervolume(means, np.full(n, HV_REFERENCE))
            candidates[method] = merged
            _log(f"merge {method}: val hypervolume {selection[method]:.4f}")
        best = max(selection, key=selection.get)
        for expert, report in candidates[best]:
            experts.append(expert)
            expert_info[expert.name] = {
                "kind": "merged",
                "method": best,
                "task_svd": report,
                "params": cfg.merge.params.get(best, {}),
            }
    lap("merge", t0)

    # 5. router experts (LoRA experts frozen), Tchebycheff + OMD; linear ablation reported only
    t0 = time.perf_counter()
    routers, router_info = [], {}
    anchors = np.stack([e.anchor for e in experts])
    for spec in cfg.routers:
        subset = [experts[i].name for i in nearest_experts(np.array(spec.anchor), anchors, spec.k)]
        info = {}
        for scal in ["tchebycheff", "linear"] if cfg.ablation_linear else ["tchebycheff"]:
            path = work / "routers" / f"{spec.name}-{scal}.safetensors"
            router = RouterExpert(name=spec.name, anchor=np.array(spec.anchor), experts=subset)
            if path.is_file():
                router = RouterExpert.load(path, spec.name, spec.anchor, subset)
                info[scal] = json.loads(path.with_suffix(".json").read_text())
            else:
                hoe = HoEModel(bb.model, cfg.objectives, experts, [router])
                training_cfg = type(spec.training)(**{**asdict(spec.training), "scalarization": scal})
                summary = train_router(hoe, tok, 0, [p for _, p in train], rewards, norms, training_cfg)
                router = hoe.export_router(0)
                hoe.detach()
                router.save(path)
                path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
                info[scal] = summary
            if scal == "tchebycheff":
                routers.append(router)
        router_info[spec.name] = {
            "subset": subset,
            "training": {k: {"seconds": v["seconds"], "final": v["curve"][-1]} for k, v in info.items()},
        }
    lap("routers", t0)

    # report: base vs each single expert on eval, mean +- 95% CI per objective (greedy)
    t0 = time.perf_counter()
    report = {"timings_s": timings, "merge_selection_hv": selection, "hv_reference": HV_REFERENCE}
    hoe = HoEModel(bb.model, cfg.objectives, experts, routers)
    decoding = DecodingConfig(**{**asdict(cfg.decoding), "temperature": 0.0})
    points = {"base": None, **{o: _vertex(n, i) for i, o in enumerate(cfg.objectives)}}
    cached_eval = work / "report_eval.json"
    evaluation = json.loads(cached_eval.read_text()) if cached_eval.is_file() else {}
    for label, lam in points.items():
        if label in evaluation:
            continue
        if lam is None:  # outside a routing block the model is the bare backbone
            from hoe_core.generation import encode_chat, generate_kwargs

            def base_method(prompts, _lam):
                import torch

                enc = encode_chat(tok, list(prompts), next(bb.model.parameters()).device)
                with torch.no_grad():
                    out = bb.model.generate(**enc, **generate_kwargs(decoding, tok))
                return [
                    tok.decode(r[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() for r in out
                ]

            rows = evaluate_grid(
                "base",
                base_method,
                evals,
                np.full((1, n), 1 / n),
                cfg.objectives,
                rewards,
                norms,
                batch_size=cfg.merge.batch_size,
            )
        else:
            rows = evaluate_grid(
                label,
                hoe_method(hoe, tok, decoding),
                evals,
                lam[None],
                cfg.objectives,
                rewards,
                norms,
                batch_size=cfg.merge.batch_size,
            )
        evaluation[label] = {
            o: asdict(mean_ci(np.array([r[f"r_{o}"] for r in rows]))) for o in cfg.objectives
        }
        cached_eval.write_text(json.dumps(evaluation, indent=2) + "\n")
    hoe.detach()
    report["eval_normalised_rewards"] = evaluation
    lap("report", t0)
    report["timings_s"] = timings
    report["total_s"] = round(time.perf_counter() - start, 1)
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    out = write_bundle(
        out_dir,
        name=cfg.name,
        backbone_spec=cfg.backbone if pico_folder is None else "backbone",
        fingerprint=bb.fingerprint,
        objectives=cfg.objectives,
        experts=experts,
        routers=routers,
        expert_info=expert_info,
        router_info=router_info,
        decoding=cfg.decoding,
        recipe={"config": asdict(cfg), "report": report},
        rewards={o: {"normalizer": norms[o].to_dict()} for o in cfg.objectives},
        backbone_dir=pico_folder,
        command=command,
    )
    _log(f"bundle written to {out} in {report['total_s']} s")
    return out
