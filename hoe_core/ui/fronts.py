"""Precomputed fronts as the app reads them: per method, the mean reward (G, N) at each
preference of the grid (G, N), from ``front-<precision>.summary.json``.

HoE's expected point at any lambda is interpolated from its grid the way the preference
router mixes anchors: the convex weights over the N nearest grid preferences that
reconstruct lambda (exact on the grid, barycentric inside a lattice cell), applied to
their mean rewards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hoe_core.routing.preference import normalize_preference, route


@dataclass(frozen=True)
class MethodFront:
    """One method's mean rewards over the preference grid."""

    name: str
    preferences: np.ndarray  # (G, N)
    means: np.ndarray  # (G, N)
    ci_low: np.ndarray  # (G, N)
    ci_high: np.ndarray  # (G, N)
    hypervolume: float
    preference_free: bool


@dataclass(frozen=True)
class Fronts:
    objectives: list[str]
    methods: dict[str, MethodFront]
    precision: str
    normalised: bool
    reference_point: list[float]
    timing: dict = field(default_factory=dict)  # method -> {"per_minute", ...} of the evaluation

    def expected(self, preference, method: str = "hoe") -> np.ndarray:
        """The method's mean rewards interpolated at ``preference``. -> (N,)"""
        if method not in self.methods:
            raise KeyError(f"no precomputed front for method {method!r}; have {sorted(self.methods)}")
        front = self.methods[method]
        lam = normalize_preference(preference, len(self.objectives))
        if front.preference_free:
            return front.means[0]
        return route(lam, front.preferences) @ front.means


def read_summary(path: str | Path, precision: str = "") -> Fronts:
    """A ``*.summary.json`` written by ``python -m hoe_core evaluate`` -> Fronts."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        objectives = list(data["objectives"])
        methods = {}
        for name, m in data["methods"].items():
            pts = m["points"]
            methods[name] = MethodFront(
                name=name,
                preferences=np.array([p["preference"] for p in pts], float),
                means=np.array([p["mean"] for p in pts], float),
                ci_low=np.array([p["ci_low"] for p in pts], float),
                ci_high=np.array([p["ci_high"] for p in pts], float),
                hypervolume=float(m["hypervolume"]),
                preference_free=bool(m.get("preference_free", False)),
            )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"precomputed front {path} cannot be read: {err}") from None
    for f in methods.values():
        if f.means.shape[1:] != (len(objectives),) or f.preferences.shape != f.means.shape:
            raise ValueError(f"precomputed front {path}: method {f.name!r} has points of the wrong shape")
    return Fronts(
        objectives=objectives,
        methods=methods,
        precision=precision or data.get("settings", {}).get("precision", ""),
        normalised=bool(data.get("normalised", False)),
        reference_point=list(data.get("reference_point", [])),
        timing=dict(data.get("timing", {})),
    )


def find_fronts(folder: str | Path, objectives: list[str], precision: str) -> Fronts | None:
    """The fronts in ``folder`` at ``precision`` (else any precision there), if they match
    the bundle's objectives; None when there are none."""
    folder = Path(folder)
    candidates = [folder / f"front-{precision}.summary.json", *sorted(folder.glob("front-*.summary.json"))]
    for path in candidates:
        if path.is_file():
            fronts = read_summary(path, path.name[len("front-") : -len(".summary.json")])
            if fronts.objectives != list(objectives):
                raise ValueError(
                    f"precomputed front {path} is for objectives {fronts.objectives}, the bundle has {objectives}"
                )
            return fronts
    return None
