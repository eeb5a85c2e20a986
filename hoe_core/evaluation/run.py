"""``python -m hoe_core evaluate``: every method over a preference grid on a prompt file, to
one CSV (resumable), plus its summary.

    for method in methods:                      (a preference-free method runs once and
        for lambda in simplex_grid(N, G):        its rows are repeated at every lambda)
            part = OUT.csv.parts/<method>/<k>.json   if done with the same settings
                   else generate + score, batched, and write it
    OUT.csv = concat(parts): method, prompt_id, w_<obj>..., r_<obj>..., text

Rewards are normalised with the bundle's statistics (the base model's samples), when the
manifest records them; ``summary['normalised']`` says which.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hoe_core.config import APP_PRECISION, DecodingConfig
from hoe_core.evaluation.front import evaluate_grid
from hoe_core.evaluation.metrics import simplex_grid


@dataclass(frozen=True)
class EvalSettings:
    """What makes two evaluations the same (recorded in every part and the summary)."""

    bundle_sha: str  # digest of manifest.json; a part records its method's inputs instead
    precision: str
    decoding: dict
    prompts_sha: str
    grid: int
    batch_size: int  # padding can change greedy answers of quantised models


def read_prompt_file(path: str | Path) -> list[tuple[str, str]]:
    """One prompt per line (blank lines skipped) -> (id, text), ids ``p0000``... by line."""
    from hoe_core.generation import clean_prompt

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"p{len(out):04d}", clean_prompt(line)))
        except ValueError as err:
            raise ValueError(f"{path}:{number}: {err}") from None
    if not out:
        raise ValueError(f"prompt file {path} has no prompts")
    return out


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def method_inputs(manifest, name: str) -> str:
    """Digest of the parts of a bundle that method ``name`` reads, so its cached answers
    survive a rebuild that leaves them alone (new routers do not redo the baselines).

    Every method: the backbone, objectives, reward normalisers and parameters. The
    baselines and single experts add the single experts' files (and a merge its recipe
    parameters); ``hoe`` adds every file, expert and router of the manifest.
    """
    config = (manifest.recipe or {}).get("config") or {}
    data: dict = {
        "backbone": manifest.backbone,
        "objectives": manifest.objectives,
        "rewards": manifest.rewards,
        "reward_params": config.get("reward_params") or {},
    }
    if name == "hoe":
        data["files"] = manifest.files
        data["experts"] = [(e.name, e.anchor, e.path, e.kind) for e in manifest.experts]
        data["routers"] = [(r.name, r.anchor, r.experts, r.path) for r in manifest.routers]
    elif name != "base":
        singles = [e for e in manifest.experts if e.kind == "single"]
        data["experts"] = [(e.name, e.anchor, e.path) for e in singles]
        data["files"] = {
            path: sha
            for path, sha in manifest.files.items()
            if any(path.startswith(e.path + "/") for e in singles)
        }
        if name.startswith("merge-"):
            from hoe_core.baselines import recipe_merge_params

            data["merge"] = recipe_merge_params(manifest, name[len("merge-") :])
    return _digest(data)


def csv_columns(objectives: Sequence[str]) -> list[str]:
    return ["method", "prompt_id", *(f"w_{o}" for o in objectives), *(f"r_{o}" for o in objectives), "text"]


def write_csv(rows: Sequence[dict], objectives: Sequence[str], out: Path) -> None:
    """Rows -> CSV with the contract's columns, written atomically."""
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(objectives))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in csv_columns(objectives)})
    tmp.replace(out)


def read_csv(path: str | Path, objectives: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
    """An evaluation CSV -> (rows with floats, objectives)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        names = objectives or [c[2:] for c in reader.fieldnames or [] if c.startswith("w_")]
        rows = []
        for r in reader:
            row = {"method": r["method"], "prompt_id": r["prompt_id"], "text": r["text"]}
            row.update({k: float(r[k]) for o in names for k in (f"w_{o}", f"r_{o}")})
            rows.append(row)
    return rows, list(names)


def evaluate_methods(
    methods: Mapping[str, Callable],
    preference_free: Callable[[str], bool],
    prompts: Sequence[tuple[str, str]],
    objectives: Sequence[str],
    grid_points: int,
    rewards: Mapping,
    normalizers: Mapping | None,
    settings: EvalSettings,
    parts_dir: Path,
    batch_size: int = 16,
    inputs: Mapping[str, str] | None = None,
) -> tuple[list[dict], dict[str, dict]]:
    """All methods over the grid; each (method, lambda) part is cached in ``parts_dir``.

    ``inputs``: per method, a digest of what it reads (:func:`method_inputs`); it stands in
    for ``settings.bundle_sha`` in that method's parts, so they outlive unrelated rebuilds.
    Returns (rows, timing per method: {"generations", "seconds", "per_minute"}).
    """
    grid = simplex_grid(len(objectives), grid_points)
    rows: list[dict] = []
    timing: dict[str, dict] = {}
    for name, method in methods.items():
        key = asdict(settings)
        if inputs is not None:
            del key["bundle_sha"]
            key["inputs"] = inputs[name]
        folder = parts_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        points = grid[:1] if preference_free(name) else grid
        seconds, generations = 0.0, 0
        method_rows: list[list[dict]] = []
        for k, lam in enumerate(points):
            part = folder / f"{k:03d}.json"
            saved = json.loads(part.read_text()) if part.is_file() else None
            if saved is None or saved.get("settings") != key or saved.get("preference") != lam.tolist():
                start = time.perf_counter()
                part_rows = evaluate_grid(
                    name, method, prompts, lam[None], objectives, rewards, normalizers, batch_size=batch_size
                )
                took = time.perf_counter() - start
                saved = {"settings": key, "preference": lam.tolist(), "seconds": took, "rows": part_rows}
                tmp = part.with_suffix(".tmp")
                tmp.write_text(json.dumps(saved, ensure_ascii=False) + "\n", encoding="utf-8")
                tmp.replace(part)  # a part is complete on disk or absent
            seconds += saved["seconds"]
            generations += len(saved["rows"])
            method_rows.append(saved["rows"])
        if preference_free(name):  # the same answers at every lambda
            method_rows = [
                [{**r, **{f"w_{o}": float(lam[i]) for i, o in enumerate(objectives)}} for r in method_rows[0]]
                for lam in grid
            ]
        for part_rows in method_rows:
            rows.extend(part_rows)
        timing[name] = {
            "generations": generations,
            "seconds": round(seconds, 1),
            "per_minute": round(60 * generations / seconds, 1) if seconds > 0 else None,
        }
    return rows, timing


def bundle_rewards(manifest) -> tuple[dict, dict | None]:
    """The bundle's reward models (with the recipe's parameters) and normalisers, if recorded."""
    from hoe_core.rewards import Normalizer, get_reward

    params = ((manifest.recipe or {}).get("config") or {}).get("reward_params") or {}
    rewards = {o: get_reward(o, **params.get(o, {})) for o in manifest.objectives}
    recorded = manifest.rewards or {}
    if all("normalizer" in (recorded.get(o) or {}) for o in manifest.objectives):
        return rewards, {o: Normalizer.from_dict(recorded[o]["normalizer"]) for o in manifest.objectives}
    return rewards, None


def evaluate_bundle(
    bundle: str | Path,
    methods: Sequence[str],
    prompts_file: str | Path,
    grid: int,
    out: str | Path,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    precision: str = APP_PRECISION,
    device: str | None = None,
    reference: Sequence[float] | None = None,
) -> dict:
    """Evaluate ``methods`` of a bundle; writes OUT.csv, OUT.summary.json and OUT.summary.md.

    Everything is validated before the model loads. Returns the summary.
    """
    from hoe_core.backbone import sha256_file
    from hoe_core.baselines import expand_methods, make_method, preference_free
    from hoe_core.bundle import load_bundle, read_manifest
    from hoe_core.evaluation.summary import markdown_table, summarize

    manifest = read_manifest(bundle)
    objectives = manifest.objectives
    names = expand_methods(methods, objectives)
    prompts = read_prompt_file(prompts_file)
    if not isinstance(grid, int) or grid < 2:
        raise ValueError(f"--grid must be an integer >= 2 (points per simplex edge), got {grid!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if reference is not None and len(reference) != len(objectives):
        raise ValueError(f"--reference needs {len(objectives)} values ({', '.join(objectives)})")
    out = Path(out)
    if out.suffix != ".csv":
        raise ValueError(f"--out must be a .csv file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    defaults = manifest.decoding_config
    decoding = DecodingConfig(
        **{
            **asdict(defaults),
            "temperature": 0.0,  # greedy: two runs give identical files
            "max_new_tokens": max_new_tokens if max_new_tokens is not None else defaults.max_new_tokens,
        }
    )
    settings = EvalSettings(
        bundle_sha=sha256_file(Path(bundle) / "manifest.json")[:16],
        precision=precision,
        decoding=asdict(decoding),
        prompts_sha=_digest(prompts),
        grid=grid,
        batch_size=batch_size,
    )
    loaded = load_bundle(bundle, precision=precision, device=device)
    rewards, normalizers = bundle_rewards(manifest)
    built = {n: make_method(n, loaded, decoding) for n in names}
    rows, timing = evaluate_methods(
        built,
        preference_free,
        prompts,
        objectives,
        grid,
        rewards,
        normalizers,
        settings,
        out.with_name(out.name + ".parts"),
        batch_size=batch_size,
        inputs={n: method_inputs(manifest, n) for n in names},
    )
    write_csv(rows, objectives, out)
    summary = summarize(rows, objectives, reference, preference_free=[n for n in names if preference_free(n)])
    summary.update(
        {
            "normalised": normalizers is not None,
            "settings": asdict(settings),
            "bundle": str(bundle),
            "prompts_file": str(prompts_file),
            "n_prompts": len(prompts),
            "timing": timing,
            "device": str(loaded.backbone.device),
        }
    )
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".summary.md").write_text(markdown_table(summary, timing))
    return summary
