"""Router experts (SPEC section 3): per-module linear gates over a subset of LoRA experts.

A router expert is anchored at a preference and gates over the experts nearest to it.
On disk: one safetensors file, keys ``<module>.weight`` (|S|, in) and ``<module>.bias``
(|S|,); its anchor and expert subset live in the bundle manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@dataclass
class RouterExpert:
    """One router expert.

    Attributes:
        name: unique name in the bundle.
        anchor: (N,) preference it is trained at.
        experts: names of the LoRA experts it gates over (its subset S).
        gates: module name -> (weight (|S|, in), bias (|S|,)); an empty dict means
            zero-initialised (uniform) gates everywhere.
    """

    name: str
    anchor: np.ndarray
    experts: list[str]
    gates: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module, (w, b) in self.gates.items():
            tensors[f"{module}.weight"] = w.detach().to(dtype).contiguous()
            tensors[f"{module}.bias"] = b.detach().to(dtype).contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path

    @classmethod
    def load(cls, path: str | Path, name: str, anchor, experts: list[str]) -> RouterExpert:
        tensors = load_file(str(path))
        gates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, w in tensors.items():
            if not key.endswith(".weight"):
                continue
            module = key.removesuffix(".weight")
            bias = tensors.get(f"{module}.bias")
            if bias is None or w.shape[0] != len(experts) or bias.shape != (len(experts),):
                raise ValueError(
                    f"router {path}: {module} gate must be ({len(experts)}, in) + bias "
                    f"({len(experts)},), got {tuple(w.shape)}"
                )
            gates[module] = (w.float(), bias.float())
        return cls(name=name, anchor=np.asarray(anchor, float), experts=list(experts), gates=gates)

    def n_parameters(self) -> int:
        return sum(w.numel() + b.numel() for w, b in self.gates.values())


def nearest_experts(anchor: np.ndarray, expert_anchors: np.ndarray, k: int) -> list[int]:
    """Indices of the k experts whose anchors are closest (L2) to ``anchor``, sorted."""
    dist = np.linalg.norm(np.asarray(expert_anchors) - np.asarray(anchor), axis=1)
    return sorted(np.argsort(dist, kind="stable")[:k].tolist())
