"""The build recipe as a typed config, loaded from ``configs/<name>.yaml``.

Every step's settings live in one frozen dataclass; unknown keys fail loudly (a typo in a
recipe must not silently fall back to a default).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hoe_core.config import DecodingConfig, TaskSVDConfig, from_dict
from hoe_core.training.experts import ExpertTrainingConfig
from hoe_core.training.routers import RouterTrainingConfig
from hoe_core.training.sampling import SamplingConfig


@dataclass(frozen=True)
class PromptSource:
    """Where train / val prompts come from: ``assets`` (assets/prompts splits) or ``inline``."""

    source: str = "assets"
    root: str = "assets/prompts"
    max_train: int | None = None  # cap for quick builds
    max_val: int | None = None
    max_eval: int | None = None  # eval prompts for the build report (defaults to max_val)
    train: tuple[str, ...] = ()  # inline prompts (source: inline)
    val: tuple[str, ...] = ()


@dataclass(frozen=True)
class MergeConfig:
    """Step 4: merged experts at anchors; the method is chosen by hypervolume on val."""

    methods: tuple[str, ...] = ("ta", "ties", "pcb")
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method; a list sweeps
    grid: int = 3  # points per simplex edge for the selection front
    max_new_tokens: int = 32
    batch_size: int = 16

    def candidates(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(label, method, params) per candidate: every method, and for a method whose
        params hold lists, every combination of their values (``ta: {scale: [1, 1.5]}``
        gives ``ta(scale=1)`` and ``ta(scale=1.5)``)."""
        out = []
        for method in self.methods:
            params = self.params.get(method, {})
            swept = {k: v for k, v in params.items() if isinstance(v, (list, tuple))}
            for values in itertools.product(*swept.values()):
                chosen = {**params, **dict(zip(swept, values))}
                tag = ",".join(f"{k}={v}" for k, v in zip(swept, values))
                out.append((f"{method}({tag})" if tag else method, method, chosen))
        return out


@dataclass(frozen=True)
class RankSweepConfig:
    """Step 3: own-objective reward retained vs task-SVD rank, on val, greedy.

    retained_i(r) = mean(own reward of expert i at rank r - base) / mean(own reward of the
    uncompressed expert i - base). Each single expert gets the smallest rank in ``ranks``
    keeping ``min_retained`` (else the largest); if the experts then exceed
    ``max_bundle_mib`` (fp16, merged experts at ``task_svd.rank``), the largest ranks step
    down until they fit. An empty ``ranks`` skips the sweep: every expert at ``task_svd.rank``.
    """

    ranks: tuple[int, ...] = ()
    min_retained: float = 0.9
    max_prompts: int | None = None  # val prompts for the sweep (None: the whole val split)
    max_bundle_mib: float = 40.0

    def __post_init__(self) -> None:
        if any(not isinstance(r, int) or r < 1 for r in self.ranks):
            raise ValueError(f"rank_sweep.ranks must be positive integers, got {list(self.ranks)}")
        if not 0.0 < self.min_retained <= 1.0:
            raise ValueError(f"rank_sweep.min_retained must be in (0, 1], got {self.min_retained}")
        if not self.max_bundle_mib > 0:
            raise ValueError(f"rank_sweep.max_bundle_mib must be positive, got {self.max_bundle_mib}")


@dataclass(frozen=True)
class RouterSpec:
    """Step 5: one router expert, anchored at ``anchor``, over its ``k`` nearest experts.

    ``init``: ``anchor`` starts the gates at the parameter-free preference routing of the
    anchor over the subset (so training starts from the interpolation it must beat),
    ``uniform`` at equal weights. ``ablation``: also train it with linear scalarisation
    (reported only) when the recipe's ``ablation_linear`` is on.
    """

    name: str
    anchor: tuple[float, ...]
    k: int = 3
    init: str = "anchor"
    ablation: bool = True
    training: RouterTrainingConfig = RouterTrainingConfig()

    def __post_init__(self) -> None:
        if self.init not in ("anchor", "uniform"):
            raise ValueError(f"router {self.name!r}: init must be 'anchor' or 'uniform', got {self.init!r}")


@dataclass(frozen=True)
class RecipeConfig:
    """A whole build: recipe YAML -> bundle."""

    name: str
    objectives: tuple[str, ...]
    backbone: str = "packaged:smollm2-135m-instruct"  # or "pico" for a tiny random model
    prompts: PromptSource = PromptSource()
    sampling: SamplingConfig = SamplingConfig()
    experts: ExpertTrainingConfig = ExpertTrainingConfig()
    task_svd: TaskSVDConfig = TaskSVDConfig()
    rank_sweep: RankSweepConfig = RankSweepConfig()
    anchors: tuple[tuple[float, ...], ...] = ()  # merged multi-objective experts
    merge: MergeConfig = MergeConfig()
    routers: tuple[RouterSpec, ...] = ()
    ablation_linear: bool = True  # also train each router with linear scalarisation (reported only)
    reward_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    decoding: DecodingConfig = DecodingConfig()
    seed: int = 0

    def __post_init__(self) -> None:
        n = len(self.objectives)
        if n < 2:
            raise ValueError(f"a recipe needs at least two objectives, got {list(self.objectives)}")
        for a in [*self.anchors, *(r.anchor for r in self.routers)]:
            if len(a) != n or min(a) < 0 or abs(sum(a) - 1) > 1e-6:
                raise ValueError(f"anchor {list(a)} must be {n} non-negative numbers summing to 1")


def _nested(cls, data: dict | None):
    return from_dict(cls, data or {})


def load_recipe(path: str | Path) -> RecipeConfig:
    """Parse and validate a recipe YAML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping")
    raw = dict(raw)
    prompts = dict(raw.pop("prompts", {}) or {})
    for key in ("train", "val"):
        if key in prompts:
            prompts[key] = tuple(prompts[key])
    task_svd = dict(raw.pop("task_svd", {}) or {})
    merge = dict(raw.pop("merge", {}) or {})
    sweep = dict(raw.pop("rank_sweep", {}) or {})
    if "ranks" in sweep:
        sweep["ranks"] = tuple(sweep["ranks"])
    if "methods" in merge:
        merge["methods"] = tuple(merge["methods"])
    experts = dict(raw.pop("experts", {}) or {})
    if "targets" in experts:
        experts["targets"] = tuple(experts["targets"])
    routers = tuple(
        from_dict(
            RouterSpec,
            {
                **r,
                "anchor": tuple(float(x) for x in r.get("anchor", ())),
                "training": _nested(RouterTrainingConfig, r.get("training")),
            },
        )
        for r in raw.pop("routers", []) or []
    )
    return from_dict(
        RecipeConfig,
        {
            **raw,
            "objectives": tuple(raw.get("objectives", ())),
            "anchors": tuple(tuple(float(x) for x in a) for a in raw.get("anchors", ())),
            "prompts": _nested(PromptSource, prompts),
            "sampling": _nested(SamplingConfig, raw.get("sampling")),
            "experts": _nested(ExpertTrainingConfig, experts),
            "task_svd": _nested(TaskSVDConfig, task_svd),
            "merge": _nested(MergeConfig, merge),
            "rank_sweep": _nested(RankSweepConfig, sweep),
            "routers": routers,
            "decoding": _nested(DecodingConfig, raw.get("decoding")),
        },
    )
