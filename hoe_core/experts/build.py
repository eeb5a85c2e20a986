"""Making LoRA experts from weights: single-objective (task-SVD of tau_i) and
multi-objective (merge of the tau_i at an anchor, then task-SVD)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from hoe_core.config import LLAMA_TARGETS, TaskSVDConfig
from hoe_core.experts.adapters import load_lora_adapter, save_lora_adapter
from hoe_core.experts.merging import merge_task_vectors
from hoe_core.experts.task_svd import (
    LowRankDelta,
    ModuleSVDReport,
    TaskVector,
    energy_summary,
    objective_vector_from_weights,
    task_svd,
)


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All safetensors weights of an HF folder (weights only; no pickle)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def objective_vector(
    base: str | None = None,
    tuned: str | None = None,
    adapter: str | None = None,
    targets: Sequence[str] = LLAMA_TARGETS,
) -> TaskVector:
    """tau from a full fine-tune (``tuned`` minus ``base``) or from a peft LoRA ``adapter``."""
    if adapter:
        return dict(load_lora_adapter(adapter))
    if not (base and tuned):
        raise ValueError("a full fine-tune needs both --base and --tuned")
    from hoe_core.backbone import resolve_backbone

    return objective_vector_from_weights(
        load_state_dict(resolve_backbone(base)), load_state_dict(tuned), tuple(targets)
    )


def merged_objective_vector(
    task_vectors: Sequence[TaskVector], anchor: Sequence[float], method: str = "ta", **params
) -> TaskVector:
    """tau_lambda = Merge({tau_i}, lambda) (SPEC section 2)."""
    return merge_task_vectors(list(task_vectors), list(anchor), method, **params)


def report_dict(reports: list[ModuleSVDReport]) -> dict:
    """A JSON-friendly summary: total rank, parameters, energy per module type."""
    return {
        "modules": len(reports),
        "mean_energy_retained": sum(r.energy_retained for r in reports) / max(len(reports), 1),
        "energy_by_type": energy_summary(reports),
        "ranks": sorted({r.rank for r in reports}),
    }


REPORT = "task_svd_report.json"


def write_expert(tau: TaskVector, config: TaskSVDConfig, out_dir: str | Path, base_model: str = "") -> dict:
    """task-SVD an objective vector and save it as a peft adapter.

    Also writes ``task_svd_report.json`` beside it: the config, and per module the rank,
    retained energy and Frobenius error. Returns the summary.
    """
    factors, reports = task_svd(tau, config)
    out = save_lora_adapter(factors, out_dir, base_model=base_model)
    n_params = sum(f.A.numel() + f.B.numel() for f in factors.values())
    summary = {"out": str(out_dir), "parameters": n_params, **report_dict(reports)}
    detail = {"config": asdict(config), "summary": summary, "per_module": [asdict(r) for r in reports]}
    (out / REPORT).write_text(json.dumps(detail, indent=2) + "\n")
    return summary


def compress(tau: TaskVector, config: TaskSVDConfig) -> tuple[dict[str, LowRankDelta], dict]:
    """task-SVD in memory: factors per module and the report."""
    factors, reports = task_svd(tau, config)
    return factors, report_dict(reports)
