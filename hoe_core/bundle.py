"""Bundles: one folder holds everything an HoE model needs besides the backbone weights.

    <bundle>/
      manifest.json          schema version, backbone id + fingerprint, objectives, anchors,
                             experts, routers, decoding defaults, recipe, provenance,
                             sha256 of every other file
      experts/<name>/        peft LoRA adapters (adapter_config.json + safetensors)
      routers/<name>.safetensors
      (backbone/)            optional: a small backbone folder shipped inside (pico bundles)

Loading verifies schema, paths (nothing outside the folder), checksums and the backbone
fingerprint *before* building anything, and names the file or field at fault. Only JSON
and safetensors are read. A failed load changes nothing on disk.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hoe_core.backbone import Backbone, load_backbone, sha256_file
from hoe_core.config import DecodingConfig, from_dict
from hoe_core.routing.model import HoEModel, LoraExpert
from hoe_core.routing.router import RouterExpert

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
#: The only kinds of file a bundle may hold: weights as safetensors, everything else JSON
#: or text (tokenizer merges, the chat template). Nothing pickled, no code.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".jinja")


class BundleError(ValueError):
    """A bundle is missing, malformed, tampered with, or for another backbone."""


@dataclass(frozen=True)
class ExpertEntry:
    name: str
    anchor: list[float]
    path: str  # relative folder of a peft LoRA adapter
    kind: str = "single"  # "single" (one objective) or "merged" (an anchor in between)
    info: dict[str, Any] = field(default_factory=dict)  # merge method, ranks, energy, ...


@dataclass(frozen=True)
class RouterEntry:
    name: str
    anchor: list[float]
    experts: list[str]
    path: str  # relative safetensors file
    info: dict[str, Any] = field(default_factory=dict)  # training summary


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated ``manifest.json``."""

    name: str
    backbone: dict[str, Any]  # {"spec": ..., "fingerprint": ...}
    objectives: list[str]
    experts: list[ExpertEntry]
    routers: list[RouterEntry]
    files: dict[str, str]  # relative path -> sha256
    decoding: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    rewards: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @property
    def decoding_config(self) -> DecodingConfig:
        return from_dict(DecodingConfig, self.decoding)


def _inside(root: Path, rel: str, what: str) -> Path:
    """Resolve ``rel`` under ``root``; refuse absolute paths and escapes (path traversal)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise BundleError(f"{what}: path {rel!r} must be a relative path inside the bundle")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BundleError(f"{what}: path {rel!r} points outside the bundle {root}")
    return path


def parse_manifest(root: Path, data: dict[str, Any]) -> Manifest:
    """Validate a manifest dict; raise BundleError naming the field at fault."""
    if not isinstance(data, dict):
        raise BundleError(f"{root / MANIFEST}: must hold a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{root / MANIFEST}: schema_version {version!r} is not supported "
            f"(this hoe_core reads {SCHEMA_VERSION})"
        )
    for key in ("name", "backbone", "objectives", "experts", "files"):
        if key not in data:
            raise BundleError(f"{root / MANIFEST}: missing field {key!r}")
    objectives = data["objectives"]
    if not (isinstance(objectives, list) and objectives and all(isinstance(o, str) for o in objectives)):
        raise BundleError(f"{root / MANIFEST}: 'objectives' must be a non-empty list of names")
    if len(set(objectives)) != len(objectives):
        raise BundleError(f"{root / MANIFEST}: duplicate objective names {objectives}")
    try:
        experts = [ExpertEntry(**e) for e in data["experts"]]
        routers = [RouterEntry(**r) for r in data.get("routers", [])]
        manifest = Manifest(**{**data, "experts": experts, "routers": routers})
    except TypeError as err:
        raise BundleError(f"{root / MANIFEST}: malformed entry ({err})") from None
    names = [e.name for e in experts] + [r.name for r in routers]
    if len(set(names)) != len(names):
        raise BundleError(f"{root / MANIFEST}: duplicate expert/router names {names}")
    for entry in [*experts, *routers]:
        anchor = np.asarray(entry.anchor, dtype=float)
        if (
            anchor.shape != (len(objectives),)
            or not np.isfinite(anchor).all()
            or (anchor < 0).any()
            or abs(anchor.sum() - 1) > 1e-6
        ):
            raise BundleError(
                f"{root / MANIFEST}: anchor of {entry.name!r} must be {len(objectives)} "
                f"non-negative numbers summing to 1, got {entry.anchor}"
            )
    for rel in manifest.files:
        _inside(root, rel, "files")
    for entry in [*experts, *routers]:
        _inside(root, entry.path, entry.name)
    if not str(manifest.backbone.get("spec", "")):
        raise BundleError(f"{root / MANIFEST}: backbone.spec is missing")
    if not str(manifest.backbone.get("fingerprint", "")):
        raise BundleError(f"{root / MANIFEST}: backbone.fingerprint is missing")
    return manifest


def read_manifest(bundle_dir: str | Path) -> Manifest:
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist")
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    return parse_manifest(root, data)


def verify_bundle(bundle_dir: str | Path) -> Manifest:
    """Check the manifest, that every file is listed and of an allowed kind, that every
    listed file exists with its sha256, and that every referenced expert/router file is
    listed. Reads only; returns the manifest."""
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    for rel in manifest.files:
        if not rel.endswith(ALLOWED_SUFFIXES):
            raise BundleError(
                f"bundle {root}: file {rel} is not allowed; a bundle holds only "
                f"{', '.join(ALLOWED_SUFFIXES)} files (no pickle, no code)"
            )
    unlisted = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(root).as_posix() not in manifest.files
    )
    unlisted = [rel for rel in unlisted if rel != MANIFEST]
    if unlisted:
        raise BundleError(
            f"bundle {root}: file {unlisted[0]} is not listed in {MANIFEST} 'files' "
            f"({len(unlisted)} unlisted); every file of a bundle must carry its sha256"
        )
    for rel, digest in manifest.files.items():
        path = _inside(root, rel, "files")
        if not path.is_file():
            raise BundleError(f"bundle {root}: file {rel} is missing")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle {root}: file {rel} fails its sha256 checksum (changed or corrupt)")
    listed = set(manifest.files)
    for entry in manifest.experts:
        for part in ("adapter_config.json", "adapter_model.safetensors"):
            if f"{Path(entry.path).as_posix()}/{part}" not in listed:
                raise BundleError(
                    f"bundle {root}: expert {entry.name!r} file {entry.path}/{part} is not listed in files"
                )
    for entry in manifest.routers:
        if Path(entry.path).as_posix() not in listed:
            raise BundleError(
                f"bundle {root}: router {entry.name!r} file {entry.path} is not listed in files"
            )
    return manifest


def provenance(command: Sequence[str] | None = None) -> dict[str, Any]:
    """Where a bundle came from: git commit, command line, versions, time."""
    import peft
    import torch
    import transformers

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain", "--untracked-files=no", "--", "hoe_core", "configs")
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),  # uncommitted code or config changes
        "command": " ".join(command if command is not None else sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


@contextmanager
def _atomic_folder(final: Path) -> Iterator[Path]:
    """A fresh sibling folder that replaces ``final`` when the block succeeds: a failed or
    partial write never leaves a half-bundle, and no stale file of an older bundle survives."""
    final.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield root
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        root.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        root.rename(final)


def write_bundle(
    out_dir: str | Path,
    *,
    name: str,
    backbone_spec: str,
    fingerprint: str,
    objectives: Sequence[str],
    experts: Sequence[LoraExpert],
    routers: Sequence[RouterExpert] = (),
    expert_info: dict[str, dict] | None = None,
    router_info: dict[str, dict] | None = None,
    decoding: DecodingConfig | None = None,
    recipe: dict[str, Any] | None = None,
    rewards: dict[str, Any] | None = None,
    backbone_dir: str | Path | None = None,
    command: Sequence[str] | None = None,
    provenance_info: dict[str, Any] | None = None,
) -> Path:
    """Write a complete bundle (fp16 safetensors) and its manifest with checksums.

    ``provenance_info`` (default: :func:`provenance` now) lets a long build record the code
    it started from rather than the code checked out when it finished.

    ``backbone_dir`` copies a (small) backbone folder into ``<bundle>/backbone`` and
    records the spec as that relative folder.
    """
    from hoe_core.experts.adapters import save_lora_adapter  # peft: imported only to write

    final = Path(out_dir)
    with _atomic_folder(final) as root:
        if backbone_dir is not None:
            shutil.copytree(backbone_dir, root / "backbone", dirs_exist_ok=True)
            backbone_spec = "backbone"
        expert_entries, router_entries = [], []
        for e in experts:
            rel = f"experts/{e.name}"
            save_lora_adapter(e.factors, root / rel, base_model=backbone_spec)
            info = (expert_info or {}).get(e.name, {})
            expert_entries.append(
                ExpertEntry(
                    name=e.name,
                    anchor=[float(x) for x in e.anchor],
                    path=rel,
                    kind=info.get("kind", "single"),
                    info={k: v for k, v in info.items() if k != "kind"},
                )
            )
        for r in routers:
            rel = f"routers/{r.name}.safetensors"
            r.save(root / rel)
            router_entries.append(
                RouterEntry(
                    name=r.name,
                    anchor=[float(x) for x in r.anchor],
                    experts=list(r.experts),
                    path=rel,
                    info=(router_info or {}).get(r.name, {}),
                )
            )
        files = {
            p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        manifest = Manifest(
            name=name,
            backbone={"spec": backbone_spec, "fingerprint": fingerprint},
            objectives=list(objectives),
            experts=expert_entries,
            routers=router_entries,
            files=files,
            decoding=asdict(decoding or DecodingConfig()),
            recipe=recipe or {},
            rewards=rewards or {},
            provenance=provenance_info or provenance(command),
        )
        parse_manifest(root, json.loads(manifest.to_json()))  # never write what we cannot read
        (root / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return final


@dataclass
class LoadedBundle:
    """A verified bundle on a loaded backbone."""

    root: Path
    manifest: Manifest
    backbone: Backbone
    hoe: HoEModel
    experts: list[LoraExpert] = field(default_factory=list)  # factors, for the merge baselines

    @property
    def objectives(self) -> list[str]:
        return self.manifest.objectives


def load_bundle(
    bundle_dir: str | Path,
    precision: str = "fp32",
    device: str | None = None,
    backbone: Backbone | None = None,
) -> LoadedBundle:
    """Verify a bundle, load its backbone (or use ``backbone``), check the fingerprint and
    attach all experts and routers."""
    from hoe_core.experts.adapters import load_lora_adapter  # peft: imported only to load

    root = Path(bundle_dir)
    manifest = verify_bundle(root)
    if backbone is None:
        backbone = load_backbone(manifest.backbone["spec"], precision, device, base_dir=root)
    if backbone.fingerprint != manifest.backbone["fingerprint"]:
        raise BundleError(
            f"bundle {root} was built for backbone {manifest.backbone['spec']!r} with fingerprint "
            f"{manifest.backbone['fingerprint']}, but the loaded backbone {backbone.spec!r} has "
            f"fingerprint {backbone.fingerprint}"
        )
    experts = []
    for entry in manifest.experts:
        try:
            factors = load_lora_adapter(root / entry.path)
        except Exception as err:  # safetensors/peft errors are not specific enough alone
            raise BundleError(
                f"bundle {root}: expert {entry.name!r} at {entry.path} cannot be read: {err}"
            ) from err
        experts.append(LoraExpert(name=entry.name, anchor=np.asarray(entry.anchor), factors=factors))
    routers = []
    for entry in manifest.routers:
        try:
            routers.append(RouterExpert.load(root / entry.path, entry.name, entry.anchor, entry.experts))
        except Exception as err:
            raise BundleError(
                f"bundle {root}: router {entry.name!r} at {entry.path} cannot be read: {err}"
            ) from err
    hoe = HoEModel(backbone.model, manifest.objectives, experts, routers)
    return LoadedBundle(root=root, manifest=manifest, backbone=backbone, hoe=hoe, experts=experts)
