"""Bundles round-trip, and refuse tampering, missing files, other backbones and bad paths
with a message naming the culprit, without touching the files."""

import json
import shutil

import numpy as np
import pytest
import torch

from hoe_core.bundle import BundleError, load_bundle, read_manifest, verify_bundle
from hoe_core.pico import save_pico_backbone


def _copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_trip_restores_experts_routers_and_anchors(pico_bundle):
    from hoe_core.experts.adapters import load_lora_adapter

    loaded = load_bundle(pico_bundle, device="cpu")
    m = loaded.manifest
    assert m.objectives == ["helpful", "harmless", "humor"]
    np.testing.assert_allclose(loaded.hoe.anchors[:3], np.eye(3))
    assert loaded.hoe.expert_names == ["helpful", "harmless", "humor"]
    assert [r.name for r in loaded.hoe.routers] == ["center"]
    # expert factors in the layer are the adapter's (fp16 on disk)
    name = "model.layers.1.mlp.up_proj"
    delta = load_lora_adapter(pico_bundle / "experts/harmless")[name]
    layer = loaded.hoe.layers[name]
    rows = layer.owner == 1
    torch.testing.assert_close(layer.lora_B[:, rows] @ layer.lora_A[rows], delta.dense())
    assert m.provenance["command"] and m.provenance["torch"]
    assert set(m.files) == {
        p.relative_to(pico_bundle).as_posix()
        for p in pico_bundle.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }


def test_every_file_is_checksummed_a_flipped_byte_is_named(pico_bundle, tmp_path):
    for i, rel in enumerate(sorted(read_manifest(pico_bundle).files)):
        b = tmp_path / f"b{i}"
        shutil.copytree(pico_bundle, b)
        data = bytearray((b / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (b / rel).write_bytes(bytes(data))
        before = _snapshot(b)
        with pytest.raises(BundleError, match=f"{rel} fails its sha256"):
            load_bundle(b, device="cpu")
        assert _snapshot(b) == before  # a failed load changes nothing


def test_missing_file_is_named(pico_bundle, tmp_path):
    b = _copy(pico_bundle, tmp_path)
    (b / "routers/center.safetensors").unlink()
    with pytest.raises(BundleError, match="routers/center.safetensors is missing"):
        verify_bundle(b)


def test_missing_bundle_and_manifest(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match="manifest.json is missing"):
        read_manifest(tmp_path)


def test_bundle_for_another_backbone_is_refused(pico_bundle, tmp_path):
    from hoe_core.backbone import load_backbone

    other = load_backbone(str(save_pico_backbone(tmp_path / "other", seed=99)), device="cpu")
    with pytest.raises(BundleError, match="fingerprint"):
        load_bundle(pico_bundle, backbone=other)


def _edit_manifest(b, fn):
    m = json.loads((b / "manifest.json").read_text())
    fn(m)
    (b / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda m: m["experts"][0].update(path="../../etc"), "outside the bundle"),
        (lambda m: m["routers"][0].update(path="/etc/passwd"), "relative path"),
        (lambda m: m["files"].update({"../x": "0"}), "outside the bundle"),
        (lambda m: m["experts"][0].update(anchor=[0.5, 0.5]), "anchor of 'helpful'"),
        (lambda m: m.pop("objectives"), "missing field 'objectives'"),
        (lambda m: m["experts"][0].update(bogus=1), "malformed entry"),
    ],
)
def test_bad_manifests_are_refused_by_field(pico_bundle, tmp_path, edit, match):
    b = _copy(pico_bundle, tmp_path)
    _edit_manifest(b, edit)
    with pytest.raises(BundleError, match=match):
        verify_bundle(b)


def test_truncated_safetensors_with_matching_checksum_is_refused(pico_bundle, tmp_path):
    from hoe_core.backbone import sha256_file

    b = _copy(pico_bundle, tmp_path)
    rel = "experts/humor/adapter_model.safetensors"
    (b / rel).write_bytes((b / rel).read_bytes()[:100])
    _edit_manifest(b, lambda m: m["files"].update({rel: sha256_file(b / rel)}))
    with pytest.raises(BundleError, match="expert 'humor'.*cannot be read"):
        load_bundle(b, device="cpu")


def test_rewriting_a_bundle_replaces_it_whole(pico_bundle, tmp_path):
    from hoe_core.bundle import write_bundle
    from hoe_core.routing.model import LoraExpert

    b = _copy(pico_bundle, tmp_path)
    m = read_manifest(b)
    loaded = load_bundle(b, device="cpu")
    (b / "stale.txt").write_text("from an older bundle")  # (an unlisted file: verify refuses it)
    experts = [LoraExpert(name=e.name, anchor=np.asarray(e.anchor), factors={}) for e in m.experts]
    with pytest.raises(ValueError, match="at least one module"):  # a failed write keeps the old bundle
        write_bundle(
            b, name="x", backbone_spec="backbone", fingerprint="f", objectives=m.objectives, experts=experts
        )
    assert (b / "stale.txt").is_file() and read_manifest(b).name == "pico"
    with pytest.raises(BundleError, match="stale.txt is not listed"):
        verify_bundle(b)
    from hoe_core.experts.adapters import load_lora_adapter

    experts = [
        LoraExpert(name=e.name, anchor=np.asarray(e.anchor), factors=load_lora_adapter(b / e.path))
        for e in m.experts
    ]
    write_bundle(
        b,
        name="again",
        backbone_spec=m.backbone["spec"],
        fingerprint=m.backbone["fingerprint"],
        objectives=m.objectives,
        experts=experts,
        backbone_dir=loaded.backbone.folder,
    )
    assert not (b / "stale.txt").exists() and verify_bundle(b).name == "again"
    assert not list(tmp_path.glob(".b.*"))  # no temporary folders left behind
