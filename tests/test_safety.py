"""Safety defaults: only safetensors and JSON are read (no pickle), no remote code, the app
binds loopback unless on Spaces or asked, never a share link, prompts are capped, and the
log carries no prompt text unless asked."""

import ast
import logging
from pathlib import Path

import pytest
import torch

import app
from hoe_core.backbone import load_backbone
from hoe_core.config import MAX_PROMPT_CHARS
from hoe_core.pico import save_pico_backbone
from hoe_core.ui.session import Session

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "hoe_core").rglob("*.py")) + [ROOT / "app.py"]


def calls(path: Path):
    """Every call in a source file: (dotted callee name, {keyword: constant or None})."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {
                k.arg: (k.value.value if isinstance(k.value, ast.Constant) else None) for k in node.keywords
            }
            yield name, keywords


def test_no_pickle_and_no_remote_code_anywhere_in_the_sources():
    assert len(SOURCES) > 20
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        assert "import pickle" not in text and "pickle.load" not in text, path
        for name, keywords in calls(path):
            if name.endswith("torch.load") or name == "load" and "weights_only" in keywords:
                assert keywords.get("weights_only") is True, f"{path}: {name} without weights_only=True"
            assert keywords.get("trust_remote_code", False) is False, f"{path}: {name} trusts remote code"


def test_backbone_and_embedder_loads_pin_safetensors_and_no_remote_code():
    for rel in ("hoe_core/backbone.py", "hoe_core/rewards/embedder.py"):
        for name, keywords in calls(ROOT / rel):
            if (
                name.startswith("AutoModel")
                and name.endswith("from_pretrained")
                and "gguf_file" not in keywords
            ):
                assert keywords.get("use_safetensors") is True and keywords.get("trust_remote_code") is False


def test_a_pickled_backbone_is_refused_without_unpickling(tmp_path, monkeypatch):
    folder = save_pico_backbone(tmp_path / "bb")
    state = load_backbone(str(folder), device="cpu").model.state_dict()
    torch.save(state, folder / "pytorch_model.bin")  # the same weights, pickled
    (folder / "model.safetensors").unlink()
    unpickled = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a) or real_load(*a, **k))
    with pytest.raises(OSError, match="safetensors"):
        load_backbone(str(folder), device="cpu")
    assert unpickled == []


@pytest.mark.parametrize(
    "host, environ, expected",
    [
        (None, {}, "127.0.0.1"),
        (None, {"SPACE_ID": "user/hoe"}, "0.0.0.0"),
        ("0.0.0.0", {}, "0.0.0.0"),
        ("127.0.0.1", {"SPACE_ID": "user/hoe"}, "127.0.0.1"),
    ],
)
def test_binds_loopback_unless_on_spaces_or_asked_and_never_shares(host, environ, expected):
    options = app.launch_options(host, 7860, environ)
    assert options == {"server_name": expected, "server_port": 7860, "share": False}


@pytest.fixture(scope="module")
def session(pico_bundle):
    return Session.load(pico_bundle, "fp32", device="cpu", with_rewards=False)


def test_the_launched_app_listens_on_loopback_without_a_share_link(session, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    demo = app.serve(session, port=None, prevent_thread_lock=True, quiet=True)
    try:
        assert demo.server_name == "127.0.0.1" and demo.local_url.startswith("http://127.0.0.1:")
        assert demo.share is False and demo.share_url is None
    finally:
        demo.close()


SECRET = "my bank password is hunter2"


def _messages(caplog):
    return "\n".join(r.getMessage() for r in caplog.records)


def test_logs_carry_no_prompt_text_by_default(session, caplog, monkeypatch):
    monkeypatch.delenv("HOE_LOG_PROMPTS", raising=False)
    with caplog.at_level(logging.DEBUG):
        list(app.on_steer(session, SECRET, 4, 0.0, 0, "helpful", "harmless", False, 1, 1, 1))
        list(app.on_compare(session, SECRET, 2, 1, 1, 1))
    logged = _messages(caplog)
    assert f"generate: prompt {len(SECRET)} chars" in logged and "compare: prompt" in logged
    assert "hunter2" not in logged


def test_prompt_text_is_logged_only_when_asked(session, caplog, monkeypatch):
    monkeypatch.setenv("HOE_LOG_PROMPTS", "1")
    with caplog.at_level(logging.INFO, logger="hoe.app"):
        list(app.on_steer(session, SECRET, 4, 0.0, 0, "helpful", "harmless", False, 1, 1, 1))
    assert f"prompt={SECRET!r}" in _messages(caplog)


def test_the_app_caps_the_prompt(session):
    *_, state = list(app.on_steer(session, "x" * 9000, 2, 0.0, 0, "helpful", "harmless", False, 1, 1, 1))[-1]
    assert len(state["prompt"]) == MAX_PROMPT_CHARS
