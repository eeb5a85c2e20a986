"""LoRA experts on disk, in the standard peft format (plain ``PeftModel`` loads them).

Folder = ``adapter_config.json`` (a peft ``LoraConfig``) + ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_{A,B}.weight``. Ranks may differ per module
(``rank_pattern``); we always write ``lora_alpha == r`` per module so that the peft
scaling alpha/r is exactly 1 and the factors carry the whole delta.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from hoe_core.experts.task_svd import LowRankDelta

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def save_lora_adapter(
    factors: dict[str, LowRankDelta],
    out_dir: str | Path,
    base_model: str = "",
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write LoRA factors as a peft adapter folder.

    Args:
        factors: module name -> LowRankDelta (B (out, r), A (r, in), scale).
        out_dir: folder to create (overwritten files, other files untouched).
        base_model: recorded as ``base_model_name_or_path``.
        dtype: storage dtype (fp16 by default, for size).
    """
    if not factors:
        raise ValueError("an adapter needs at least one module")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = {name: f.A.shape[0] for name, f in factors.items()}
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): r for n, r in ranks.items() if r != default_r}
    config = LoraConfig(
        r=default_r,
        lora_alpha=default_r,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in factors}),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model or None,
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, f in factors.items():
        # Fold the scale into B so that the stored delta is exactly B @ A.
        tensors[f"{PREFIX}{name}.lora_A.weight"] = f.A.to(dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (f.B.float() * f.scale).to(dtype).contiguous()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    # peft stores target_modules as a set: sort it so the same expert gives the same bytes
    saved = json.loads((out / CONFIG).read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    (out / CONFIG).write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return out


def lora_scale(config: LoraConfig, module: str) -> float:
    """peft's scaling for one module: alpha/r (or alpha/sqrt(r) with rsLoRA)."""
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / (r**0.5 if config.use_rslora else r)


def load_lora_adapter(adapter_dir: str | Path) -> dict[str, LowRankDelta]:
    """Read a peft LoRA folder as module name -> LowRankDelta (float32, peft's scale)."""
    path = Path(adapter_dir)
    for needed in (CONFIG, WEIGHTS):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"LoRA adapter {path}: missing {needed}")
    config = LoraConfig.from_pretrained(str(path))
    tensors = load_file(str(path / WEIGHTS))
    out: dict[str, LowRankDelta] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if b_key not in tensors:
            raise ValueError(f"LoRA adapter {path}: {key} has no matching lora_B")
        b = tensors[b_key]
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"LoRA adapter {path}: rank mismatch in {module}")
        out[module] = LowRankDelta(B=b.float(), A=a.float(), scale=lora_scale(config, module))
    if not out:
        raise ValueError(f"LoRA adapter {path}: no lora_A weights found")
    return out
