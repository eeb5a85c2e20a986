"""The build: recipe YAML -> bundle. Each arrow is a resumable step whose output sits in the
work folder (``build-cache/<name>`` by default); a rerun skips what is done.

    samples/ (sample + score)  ->  dpo/<objective>/ (single-objective LoRA, DPO)
      -> task-SVD LoRA experts  ->  merged experts at anchors (method chosen by val hypervolume)
      -> routers/ (Tchebycheff + OMD; linear ablation)  ->  report.json  ->  bundle
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from hoe_core.config import DecodingConfig
from hoe_core.evaluation.front import evaluate_grid, hoe_method, mean_front, model_method
from hoe_core.evaluation.metrics import hypervolume, mean_ci, simplex_grid
from hoe_core.experts.adapters import load_lora_adapter
from hoe_core.experts.build import compress, merged_objective_vector
from hoe_core.routing.model import HoEModel, LoraExpert
from hoe_core.routing.preference import route
from hoe_core.routing.router import RouterExpert, nearest_experts
from hoe_core.training import distributed
from hoe_core.training.experts import train_dpo_expert
from hoe_core.training.recipe_config import RecipeConfig
from hoe_core.training.routers import train_router
from hoe_core.training.sampling import preference_pairs, sample_and_score

HV_REFERENCE = -1.0  # per objective, in normalised reward units (base samples have mean 0, std 1)


def _log(msg: str) -> None:
    if distributed.is_main():
        print(f"[build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _prompts(cfg: RecipeConfig) -> tuple[list, list, list, list]:
    """(train, val, eval, sweep) as (id, text) lists; sweep: val capped by rank_sweep.max_prompts."""
    src = cfg.prompts
    if src.source == "inline":
        train = [(f"train-{i}", p) for i, p in enumerate(src.train)]
        val = [(f"val-{i}", p) for i, p in enumerate(src.val)]
        return train, val, val, val
    if src.source != "assets":
        raise ValueError(f"prompts.source must be 'assets' or 'inline', got {src.source!r}")
    from hoe_core.data.prompts import load_prompts

    def spaced(records: list, cap: int | None) -> list:
        if cap and cap < len(records):  # evenly spaced: the files are grouped by source
            keep = np.linspace(0, len(records) - 1, cap).round().astype(int)
            records = [records[i] for i in keep]
        return records

    def pairs(split: str, cap: int | None) -> list[tuple[str, str]]:
        return [(r.id, r.prompt) for r in spaced(load_prompts(split, Path(src.root)), cap)]

    sweep = pairs("val", cfg.rank_sweep.max_prompts)
    if src.max_val and cfg.rank_sweep.max_prompts and src.max_val > cfg.rank_sweep.max_prompts:
        raise ValueError(
            f"prompts.max_val ({src.max_val}) must not exceed rank_sweep.max_prompts "
            f"({cfg.rank_sweep.max_prompts}): the merge selection reuses the sweep's vertex rows"
        )
    # val is drawn from the sweep prompts, so the expert rows evaluated there serve both
    return (
        pairs("train", src.max_train),
        spaced(sweep, src.max_val),
        pairs("eval", src.max_eval or src.max_val),
        sweep,
    )


def _backbone(cfg: RecipeConfig, work: Path):
    from hoe_core.backbone import load_backbone
    from hoe_core.pico import save_pico_backbone

    device = str(distributed.state().device)  # this process's device under accelerate launch
    if cfg.backbone == "pico":
        folder = work / "backbone"
        if distributed.is_main() and not (folder / "config.json").is_file():
            save_pico_backbone(folder, seed=cfg.seed)
        distributed.barrier()
        return load_backbone(str(folder), "fp32", device), folder
    return load_backbone(cfg.backbone, "fp32", device), None


def _vertex(n: int, i: int) -> np.ndarray:
    v = np.zeros(n)
    v[i] = 1.0
    return v


def _cached_rows(path: Path, compute, *args) -> list[dict]:
    """Evaluation rows from ``path`` if a previous run wrote them, else ``compute(*args)``, written."""
    if path.is_file():
        return json.loads(path.read_text())
    rows = compute(*args)  # every process computes (greedy: the same rows); the main one writes
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows) + "\n")
        tmp.replace(path)  # complete on disk or absent: other processes may read it
    return rows


def _key(*parts) -> str:
    """A short digest of a step's inputs: cache files carry it in their names, so changing
    an input (a rank, the merge params, the prompts, a retrained expert) recomputes the step."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _column(rows: list[dict], objective: str) -> np.ndarray:
    """(P,) rewards on ``objective``, rows in prompt order (one preference per row set)."""
    return np.array([r[f"r_{objective}"] for r in sorted(rows, key=lambda r: r["prompt_id"])])


def _own_means(rows: list[dict], objectives) -> np.ndarray:
    """(N,) mean reward of objective i over the rows at vertex preference i."""
    return np.array([np.mean([r[f"r_{o}"] for r in rows if r[f"w_{o}"] == 1.0]) for o in objectives])


def _retained(base: np.ndarray, full: np.ndarray, at_rank: np.ndarray) -> list[float | None]:
    """Fraction of each expert's own-objective gain over the base kept at a rank (None: no gain)."""
    return [None if f - b <= 0 else float((r - b) / (f - b)) for b, f, r in zip(base, full, at_rank)]


def build(cfg: RecipeConfig, out_dir: str | Path, work_dir: str | Path | None = None, command=None) -> Path:
    """Run every step of the recipe and write the bundle to ``out_dir``."""
    from hoe_core.bundle import provenance, write_bundle
    from hoe_core.rewards import fit_normalizer, get_reward

    start = time.perf_counter()
    started_from = provenance(command)  # the code this build runs, not what is checked out at its end
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
    train, val, evals, sweep_prompts = _prompts(cfg)
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

    val_decoding = DecodingConfig(
        **{**asdict(cfg.decoding), "max_new_tokens": cfg.merge.max_new_tokens, "temperature": 0.0}
    )

    # 2. single-objective fine-tunes (DPO LoRA), resumable per objective
    t0 = time.perf_counter()
    training = {}
    for o in cfg.objectives:
        adapter = work / "dpo" / o
        pairs = preference_pairs(samples, o, cfg.experts.min_gap, cfg.experts.max_pairs)
        key = _key(pairs, asdict(cfg.experts))  # a changed config or sample set retrains
        done = adapter / "training.json"
        if not done.is_file() or json.loads(done.read_text()).get("key") != key:
            _log(f"DPO expert for {o} on {len(pairs)} pairs")
            train_dpo_expert(bb.model, tok, pairs, cfg.experts, adapter, key=key)
        training[o] = json.loads(done.read_text())
    taus = {o: dict(load_lora_adapter(work / "dpo" / o)) for o in cfg.objectives}
    from hoe_core.backbone import sha256_file

    dpo_key = _key([sha256_file(work / "dpo" / o / "adapter_model.safetensors") for o in cfg.objectives])
    val_key = _key(sweep_prompts, asdict(val_decoding), cfg.reward_params, dpo_key)
    lap("experts", t0)

    # 3. task-SVD -> single-objective LoRA experts at the vertices; the rank from a sweep on val
    t0 = time.perf_counter()

    def evaluate(method_name, method, grid, prompts=val):
        return evaluate_grid(
            method_name,
            method,
            prompts,
            grid,
            cfg.objectives,
            rewards,
            norms,
            batch_size=cfg.merge.batch_size,
        )

    def evaluate_hoe(method_name, hoe_experts, grid, prompts=val):
        hoe = HoEModel(bb.model, cfg.objectives, hoe_experts)
        try:
            return evaluate(method_name, hoe_method(hoe, tok, val_decoding), grid, prompts)
        finally:
            hoe.detach()

    def single_experts(ranks: dict[str, int]):
        out, reports = [], {}
        for i, o in enumerate(cfg.objectives):
            factors, reports[o] = compress(taus[o], replace(cfg.task_svd, rank=ranks[o]))
            out.append(LoraExpert(name=o, anchor=_vertex(n, i), factors=factors))
        return out, reports

    vertices = np.eye(n)
    sweep_report = None
    chosen = {o: cfg.task_svd.rank for o in cfg.objectives}
    candidates = sorted(cfg.rank_sweep.ranks) or [cfg.task_svd.rank]
    rank_rows: dict[int, list[dict]] = {}
    for r in candidates:  # every single expert at rank r, each at its own vertex, on the sweep prompts
        ranked, _ = single_experts(dict.fromkeys(cfg.objectives, r))
        rank_rows[r] = _cached_rows(
            work / "val_rows" / f"rank-{r}-{_key(asdict(replace(cfg.task_svd, rank=r)), val_key)}.json",
            evaluate_hoe,
            f"rank-{r}",
            ranked,
            vertices,
            sweep_prompts,
        )
    if cfg.rank_sweep.ranks:
        base_rows = _cached_rows(
            work / "val_rows" / f"base-{val_key}.json",
            evaluate,
            "base",
            model_method(bb.model, tok, val_decoding),
            np.full((1, n), 1 / n),
            sweep_prompts,
        )
        base_own = np.array([np.mean([r[f"r_{o}"] for r in base_rows]) for o in cfg.objectives])
        full = [
            LoraExpert(name=o, anchor=_vertex(n, i), factors=taus[o]) for i, o in enumerate(cfg.objectives)
        ]
        full_rows = _cached_rows(
            work / "val_rows" / f"full-{val_key}.json", evaluate_hoe, "full", full, vertices, sweep_prompts
        )
        full_own = _own_means(full_rows, cfg.objectives)
        own = {r: _own_means(rows, cfg.objectives) for r, rows in rank_rows.items()}
        retained = {r: _retained(base_own, full_own, own[r]) for r in candidates}
        for r in candidates:
            _log(f"rank {r}: own-objective gain retained {retained[r]}")
        target = cfg.rank_sweep.min_retained
        for i, o in enumerate(cfg.objectives):
            keeps = [r for r in candidates if retained[r][i] is None or retained[r][i] >= target]
            chosen[o] = keeps[0] if keeps else candidates[-1]
        per_rank = sum(
            d.shape[0] + d.shape[1] for d in taus[cfg.objectives[0]].values()
        )  # params per rank unit
        budget = cfg.rank_sweep.max_bundle_mib * 2**20 / 2  # fp16 parameters

        def params() -> int:
            return per_rank * (sum(chosen.values()) + len(cfg.anchors) * cfg.task_svd.rank)

        while params() > budget and max(chosen.values()) > candidates[0]:
            top = max(chosen, key=chosen.get)  # step the largest rank down one candidate
            chosen[top] = candidates[candidates.index(chosen[top]) - 1]
        _log(f"ranks {chosen} ({2 * params() / 2**20:.1f} MiB of experts in fp16)")
        sweep_report = {
            "objectives": list(cfg.objectives),
            "prompts": len(sweep_prompts),
            "base_own_reward": base_own.tolist(),
            "full_own_reward": full_own.tolist(),
            "own_reward": {str(r): v.tolist() for r, v in own.items()},
            "retained": {str(r): v for r, v in retained.items()},
            "min_retained": target,
            "chosen_ranks": chosen,
            "retained_at_chosen": {o: retained[chosen[o]][i] for i, o in enumerate(cfg.objectives)},
            "target_met": all(
                retained[chosen[o]][i] is None or retained[chosen[o]][i] >= target
                for i, o in enumerate(cfg.objectives)
            ),
            "experts_mib_fp16": round(2 * params() / 2**20, 1),
        }
    experts, svd_reports = single_experts(chosen)
    expert_info = {
        o: {
            "kind": "single",
            "task_svd": svd_reports[o],
            "dpo": {k: v for k, v in training[o].items() if k != "log"},
        }
        for o in cfg.objectives
    }
    # each single expert at its own vertex (its chosen rank), on the sweep prompts: the ideal
    # point z*; the val prompts among them join the merge selection's front
    vertex_rows = [
        row for i, o in enumerate(cfg.objectives) for row in rank_rows[chosen[o]] if row[f"w_{o}"] == 1.0
    ]
    val_ids = {pid for pid, _ in val}
    val_vertex_rows = [row for row in vertex_rows if row["prompt_id"] in val_ids]
    lap("task_svd", t0)

    # 4. merged experts at anchors: one candidate set per method, chosen by val hypervolume
    t0 = time.perf_counter()
    selection = {}
    if cfg.anchors:
        grid = simplex_grid(n, cfg.merge.grid)
        interior = grid[grid.max(1) < 1.0]  # vertices are the single experts, already evaluated

        def merged_anchors(method: str, params: dict) -> list[tuple[LoraExpert, dict]]:
            out = []
            for a in cfg.anchors:
                tau = merged_objective_vector([taus[o] for o in cfg.objectives], list(a), method, **params)
                factors, report = compress(tau, cfg.task_svd)
                name = "merge-" + "-".join(f"{x:.2f}" for x in a)
                out.append((LoraExpert(name=name, anchor=np.array(a), factors=factors), report))
            return out

        candidates = {}
        for label, method, params in cfg.merge.candidates():
            key = _key(params, cfg.anchors, cfg.merge.grid, asdict(cfg.task_svd), val, val_key)
            path = work / "merge" / f"{method}-{key}.json"  # delete build-cache/<name>/merge to redo
            if path.is_file():  # cached: only the winner's anchors get merged, below
                rows, merged = _cached_rows(path, None), None
            else:
                merged = merged_anchors(method, params)
                rows = _cached_rows(path, evaluate_hoe, label, experts + [m for m, _ in merged], interior)
            _, means = mean_front(val_vertex_rows + rows, cfg.objectives)
            selection[label] = hypervolume(means, np.full(n, HV_REFERENCE))
            candidates[label] = (method, params, merged)
            _log(f"merge {label}: val hypervolume {selection[label]:.4f}")
        best = max(selection, key=selection.get)
        method, params, merged = candidates[best]
        for expert, report in merged or merged_anchors(method, params):
            experts.append(expert)
            expert_info[expert.name] = {
                "kind": "merged",
                "method": method,
                "task_svd": report,
                "params": params,
            }
    lap("merge", t0)

    # 5. router experts (LoRA experts frozen), Tchebycheff + OMD; linear ablation reported only
    t0 = time.perf_counter()
    routers, router_info = [], {}
    anchors = np.stack([e.anchor for e in experts])
    ideal = _own_means(vertex_rows, cfg.objectives)  # z*: each single expert's own reward (val)
    for spec in cfg.routers:
        nearest = nearest_experts(np.array(spec.anchor), anchors, spec.k)
        subset = [experts[i].name for i in nearest]
        info = {}
        for scal in ["tchebycheff", "linear"] if cfg.ablation_linear and spec.ablation else ["tchebycheff"]:
            settings = {k: v for k, v in asdict(spec).items() if k != "ablation"}
            inputs = _key(settings, expert_info, dpo_key, train, cfg.reward_params, ideal.tolist())
            path = work / "routers" / f"{spec.name}-{scal}-{inputs}.safetensors"
            router = RouterExpert(name=spec.name, anchor=np.array(spec.anchor), experts=subset)
            if path.is_file():
                router = RouterExpert.load(path, spec.name, spec.anchor, subset)
                info[scal] = json.loads(path.with_suffix(".json").read_text())
            else:
                hoe = HoEModel(bb.model, cfg.objectives, experts, [router])
                if spec.init == "anchor":  # start from the interpolation the router must beat
                    hoe.set_router_prior(0, route(np.array(spec.anchor), anchors[nearest]))
                training_cfg = type(spec.training)(**{**asdict(spec.training), "scalarization": scal})
                summary = train_router(
                    hoe, tok, 0, [p for _, p in train], rewards, norms, training_cfg, ideal=ideal
                )
                router = hoe.export_router(0)
                hoe.detach()
                if distributed.is_main():
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
    report = {
        "timings_s": timings,
        "rank_sweep": sweep_report,
        "ideal_point": ideal.tolist(),
        "merge_selection_hv": selection,
        "hv_reference": HV_REFERENCE,
    }
    hoe = HoEModel(bb.model, cfg.objectives, experts, routers)
    decoding = DecodingConfig(**{**asdict(cfg.decoding), "temperature": 0.0})
    points = {"base": None, **{o: _vertex(n, i) for i, o in enumerate(cfg.objectives)}}
    eval_key = _key(evals, asdict(cfg.decoding), cfg.reward_params, expert_info, router_info)
    eval_rows = {}
    for label, lam in points.items():
        if lam is None:  # outside a routing block the model is the bare backbone
            method, grid = model_method(bb.model, tok, decoding), np.full((1, n), 1 / n)
        else:
            method, grid = hoe_method(hoe, tok, decoding), lam[None]
        eval_rows[label] = _cached_rows(
            work / "eval_rows" / f"{label}-{eval_key}.json",
            evaluate_grid,
            label,
            method,
            evals,
            grid,
            cfg.objectives,
            rewards,
            norms,
            cfg.merge.batch_size,
        )
    evaluation = {
        label: {o: asdict(mean_ci(_column(rows, o))) for o in cfg.objectives}
        for label, rows in eval_rows.items()
    }
    # the same prompts for every model: expert - base per prompt is the sharper comparison
    paired = {
        label: {o: asdict(mean_ci(_column(rows, o) - _column(eval_rows["base"], o))) for o in cfg.objectives}
        for label, rows in eval_rows.items()
        if label != "base"
    }
    hoe.detach()
    report["eval_normalised_rewards"] = evaluation
    report["eval_gain_over_base_paired"] = paired
    report["eval_prompts"] = len(evals)
    lap("report", t0)
    report["timings_s"] = timings
    report["total_s"] = round(time.perf_counter() - start, 1)
    if not distributed.is_main():  # under accelerate launch the main process writes the bundle
        distributed.barrier()
        return Path(out_dir)
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
        provenance_info=started_from,
    )
    _log(f"bundle written to {out} in {report['total_s']} s")
    distributed.barrier()
    return out
