"""Plotly figures for the app: the Pareto plot (2-D projection or 3-D) of the precomputed
fronts with HoE's expected point at the current lambda and the live answer's rewards, and
the token x expert heatmap of the router gates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from hoe_core.ui.fronts import Fronts

COLORS = {
    "hoe": "#d62728",
    "rs": "#1f77b4",
    "mod": "#2ca02c",
    "merge-ta": "#9467bd",
    "merge-ties": "#8c564b",
    "base": "#7f7f7f",
}
CURRENT = "HoE at λ (expected)"
LIVE = "this answer (measured)"


def _hover(objectives: Sequence[str], prefs: np.ndarray, means: np.ndarray) -> list[str]:
    return [
        "λ = ("
        + ", ".join(f"{x:.2f}" for x in p)
        + ")<br>"
        + "<br>".join(f"{o}: {v:.2f}" for o, v in zip(objectives, m))
        for p, m in zip(prefs, means)
    ]


def pareto_figure(
    fronts: Fronts,
    axes: Sequence[int] = (0, 1),
    preference: Sequence[float] | None = None,
    live: Sequence[float] | None = None,
) -> go.Figure:
    """Every method's mean rewards over the grid, on the objectives ``axes`` (2 -> 2-D
    projection, 3 -> 3-D scatter); HoE's expected point at ``preference`` and the live
    answer's rewards ``live`` (N,) as distinct markers."""
    axes = list(axes)
    if len(axes) not in (2, 3) or len(set(axes)) != len(axes):
        raise ValueError(f"axes must be 2 or 3 distinct objective indices, got {axes}")
    if max(axes) >= len(fronts.objectives) or min(axes) < 0:
        raise ValueError(f"axes {axes} out of range for objectives {fronts.objectives}")
    names = [fronts.objectives[i] for i in axes]
    three = len(axes) == 3
    fig = go.Figure()

    def add(name, points, hover, **marker):
        coords = {k: points[:, j] for j, k in enumerate("xyz"[: len(axes)])}
        trace = go.Scatter3d if three else go.Scatter
        fig.add_trace(
            trace(name=name, mode="markers", marker=marker, hovertext=hover, hoverinfo="text+name", **coords)
        )

    for name, front in fronts.methods.items():
        if name.startswith("expert-"):
            color, symbol = "#ff7f0e", "square"
        else:
            color, symbol = COLORS.get(name, "#17becf"), "circle"
        means = front.means[:1] if front.preference_free else front.means
        prefs = front.preferences[:1] if front.preference_free else front.preferences
        size = 9 if name == "hoe" else 7
        add(
            name,
            means[:, axes],
            _hover(fronts.objectives, prefs, means),
            color=color,
            symbol=symbol,
            size=size,
        )
    if preference is not None and "hoe" in fronts.methods:
        point = fronts.expected(preference)
        lam = np.asarray(preference, float) / np.sum(preference)
        add(
            CURRENT,
            point[None, axes],
            _hover(fronts.objectives, lam[None], point[None]),
            color="#d62728",
            symbol="diamond" if three else "star",
            size=16 if not three else 9,
            line={"color": "black", "width": 2},
        )
    if live is not None:
        live = np.asarray(live, float)
        hover = ["<br>".join(f"{o}: {v:.2f}" for o, v in zip(fronts.objectives, live))]
        add(LIVE, live[None, axes], hover, color="black", symbol="x", size=6 if three else 12)
    unit = "normalised reward" if fronts.normalised else "reward"
    layout = {"legend": {"orientation": "h", "y": -0.2}, "margin": {"l": 10, "r": 10, "t": 30, "b": 10}}
    if three:
        fig.update_layout(scene={f"{k}axis_title": n for k, n in zip("xyz", names)}, **layout)
    else:
        fig.update_layout(xaxis_title=f"{names[0]} ({unit})", yaxis_title=f"{names[1]} ({unit})", **layout)
    fig.update_layout(title=f"Pareto fronts ({fronts.precision})")
    return fig


def gate_heatmap(tokens: Sequence[str], gates: np.ndarray, experts: Sequence[str]) -> go.Figure:
    """Token x expert heatmap: ``gates`` (T, E), each row the mean gate over the layers."""
    gates = np.asarray(gates, float)
    if gates.shape != (len(tokens), len(experts)):
        raise ValueError(f"gates {gates.shape} do not match {len(tokens)} tokens x {len(experts)} experts")
    fig = go.Figure(
        go.Heatmap(
            z=gates.T,
            x=[f"{i}:{t}" for i, t in enumerate(tokens)],
            y=list(experts),
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            colorbar={"title": "gate"},
        )
    )
    fig.update_layout(
        xaxis_title="generated token", yaxis_title="expert", margin={"l": 10, "r": 10, "t": 30, "b": 10}
    )
    return fig
