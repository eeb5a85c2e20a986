"""Bundle rows of issue 7, through every door: the Python API (``load_bundle``), the CLI
(``verify`` and ``generate``) and the app (``python app.py --bundle``). Each refusal names
the file or field at fault, and nothing on disk changes: every file under the test's
folder (the bundle, its neighbours, the outside file a bad manifest points at) has the
same bytes, and no file appears or disappears.
"""

import hashlib
import json
import os
import shutil

import pytest

import app
from hoe_core.backbone import sha256_file
from hoe_core.bundle import BundleError, load_bundle
from tests.test_cli import run


def snapshot(folder):
    """Every entry under ``folder``: sha256 of files, target of symlinks."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def edit_manifest(bundle, fn):
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def relist(bundle, rel):
    """Record ``rel``'s current sha256 in the manifest (a consistent tamperer)."""
    edit_manifest(bundle, lambda m: m["files"].update({rel: sha256_file(bundle / rel)}))


EXPERT = "experts/humor/adapter_model.safetensors"


def flip_byte(b):
    data = bytearray((b / EXPERT).read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / EXPERT).write_bytes(bytes(data))


def truncate(b):
    (b / EXPERT).write_bytes((b / EXPERT).read_bytes()[:100])


def truncate_and_relist(b):
    truncate(b)
    relist(b, EXPERT)


def symlink_outside(b):
    (b / EXPERT).unlink()
    (b / EXPERT).symlink_to(b.parent / "outside.safetensors")


def pickle_weights(b):
    (b / "backbone" / "pytorch_model.bin").write_bytes(b"\x80\x04pickled")
    relist(b, "backbone/pytorch_model.bin")


ROWS = [  # (row, how to break a copy of the pico bundle, message)
    ("missing path", lambda b: shutil.rmtree(b), "bundle folder {b} does not exist"),
    ("missing manifest", lambda b: (b / "manifest.json").unlink(), "manifest.json is missing"),
    (
        "missing file",
        lambda b: (b / "routers/center.safetensors").unlink(),
        "routers/center.safetensors is missing",
    ),
    ("truncated safetensors", truncate, f"file {EXPERT} fails its sha256 checksum"),
    (
        "truncated safetensors, checksum updated",
        truncate_and_relist,
        "expert 'humor' at experts/humor cannot be read",
    ),
    ("flipped byte", flip_byte, f"file {EXPERT} fails its sha256 checksum"),
    (
        "unknown schema version",
        lambda b: edit_manifest(b, lambda m: m.update(schema_version=2)),
        "schema_version 2 is not supported (this hoe_core reads 1)",
    ),
    (
        "another backbone",
        lambda b: edit_manifest(b, lambda m: m["backbone"].update(fingerprint="0123456789abcdef")),
        "was built for backbone 'backbone' with fingerprint 0123456789abcdef, but the loaded backbone",
    ),
    (
        "unknown packaged backbone",
        lambda b: edit_manifest(b, lambda m: m["backbone"].update(spec="packaged:nope")),
        "unknown packaged backbone 'nope'",
    ),
    (
        "path traversal (expert path)",
        lambda b: edit_manifest(b, lambda m: m["experts"][0].update(path="../outside")),
        "helpful: path '../outside' points outside the bundle",
    ),
    (
        "path traversal (listed file)",
        lambda b: edit_manifest(b, lambda m: m["files"].update({"../outside.safetensors": "0" * 64})),
        "files: path '../outside.safetensors' points outside the bundle",
    ),
    (
        "path traversal (absolute)",
        lambda b: edit_manifest(
            b, lambda m: m["routers"][0].update(path=str(b.parent / "outside.safetensors"))
        ),
        "must be a relative path inside the bundle",
    ),
    ("path traversal (symlink)", symlink_outside, f"files: path '{EXPERT}' points outside the bundle"),
    (
        "unlisted file",
        lambda b: (b / "experts/notes.json").write_text("{}"),
        "file experts/notes.json is not listed",
    ),
    ("pickle file", pickle_weights, "file backbone/pytorch_model.bin is not allowed"),
]


# rows whose files match their checksums: `verify` passes, loading refuses
LOAD_ONLY = {"truncated safetensors, checksum updated", "another backbone", "unknown packaged backbone"}


@pytest.fixture()
def broken(request, pico_bundle, tmp_path):
    """(row, bundle folder, message, snapshot of tmp_path) for one row."""
    row, breaks, message = request.param
    bundle = tmp_path / "bundle"
    shutil.copytree(pico_bundle, bundle)
    (tmp_path / "outside.safetensors").write_bytes((pico_bundle / EXPERT).read_bytes())
    breaks(bundle)
    return row, bundle, message.format(b=bundle), snapshot(tmp_path)


@pytest.mark.parametrize("broken", ROWS, ids=[r[0] for r in ROWS], indirect=True)
def test_bad_bundle_is_refused_by_name_everywhere_and_nothing_changes(broken, tmp_path, capsys):
    row, bundle, message, before = broken
    with pytest.raises(ValueError) as err:  # BundleError, or the backbone resolver's ValueError
        load_bundle(bundle, device="cpu")
    assert message in str(err.value)
    verify = run("verify", "--bundle", str(bundle), check=False)
    generate = run(
        "generate",
        "--bundle",
        str(bundle),
        "--prompt=hi",
        "--preference=1,1,1",
        "--max-new-tokens=2",
        check=False,
    )
    if row in LOAD_ONLY:
        assert verify.returncode == 0  # the files are intact: loading them finds it out
    else:
        assert verify.returncode == 2 and verify.stderr.startswith("error: ") and message in verify.stderr
    assert generate.returncode == 2 and "error: " in generate.stderr and message in generate.stderr
    assert generate.stdout == ""
    capsys.readouterr()
    assert app.main(["--bundle", str(bundle), "--precision", "fp32"]) == 2  # no server started
    err = capsys.readouterr().err
    assert "error: " in err and message in err
    assert snapshot(tmp_path) == before  # a failed load changes nothing on disk


def test_bundle_errors_are_value_errors_with_the_culprit_first(pico_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(pico_bundle, b)
    flip_byte(b)
    with pytest.raises(BundleError, match=f"^bundle {b}: file {EXPERT} fails"):
        load_bundle(b, device="cpu")


def test_the_intact_copy_loads(pico_bundle, tmp_path):
    """The control: the same copy and the outside file, unbroken, load fine."""
    b = tmp_path / "bundle"
    shutil.copytree(pico_bundle, b)
    before = snapshot(tmp_path)
    assert load_bundle(b, device="cpu").manifest.name == "pico"
    assert run("verify", "--bundle", str(b)).returncode == 0
    assert snapshot(tmp_path) == before
