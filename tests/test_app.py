"""The app's event functions on a pico bundle with synthetic fronts, and its named API
endpoints through gradio_client against the launched app."""

import json

import gradio as gr
import numpy as np
import pytest

import app
from hoe_core.evaluation.metrics import simplex_grid
from hoe_core.evaluation.summary import summarize
from hoe_core.ui.fronts import find_fronts
from hoe_core.ui.plots import CURRENT, LIVE
from hoe_core.ui.session import COMPARE_METHODS, Session

OBJECTIVES = ["helpful", "harmless", "humor"]


def synthetic_fronts(folder):
    """A front where each method's mean reward is a known function of lambda."""
    rows = []
    for lam in simplex_grid(3, 3):
        for method, scale in [("hoe", 1.0), ("rs", 0.8), ("base", 0.0)]:
            for pid in range(2):
                row = {"method": method, "prompt_id": f"p{pid}", "text": "x"}
                row.update({f"w_{o}": float(lam[i]) for i, o in enumerate(OBJECTIVES)})
                row.update({f"r_{o}": float(scale * lam[i] + 0.01 * pid) for i, o in enumerate(OBJECTIVES)})
                rows.append(row)
    summary = summarize(rows, OBJECTIVES, preference_free=["base"])
    summary.update(
        {"normalised": True, "settings": {"precision": "fp32"}, "timing": {"hoe": {"per_minute": 12.0}}}
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "front-fp32.summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture(scope="module")
def session(pico_bundle, tmp_path_factory):
    fronts = synthetic_fronts(tmp_path_factory.mktemp("fronts") / "pico")
    return Session.load(pico_bundle, "fp32", device="cpu", fronts_dir=fronts)


def test_describe_weights_normalises_and_names_active_anchors(session):
    text = app.describe_weights(session, [2, 5, 3])
    assert "**helpful** 0.20" in text and "**harmless** 0.50" in text
    assert "center 0.60" in text and "helpful" not in text.split("Active")[1]


def test_bad_sliders_and_prompts_give_clear_errors(session):
    assert "not all be zero" in app.on_sliders(session, "helpful", "harmless", False, 0, 0, 0)[0]
    with pytest.raises(gr.Error, match="prompt is empty"):
        list(app.on_steer(session, "   ", 8, 0.0, 0, "helpful", "harmless", False, 1, 0, 0))
    with pytest.raises(gr.Error, match="max_new_tokens"):
        list(app.on_steer(session, "hi", 0, 0.0, 0, "helpful", "harmless", False, 1, 0, 0))


def test_expected_point_is_exact_on_the_grid_and_interpolates_between(session):
    fronts = session.fronts
    np.testing.assert_allclose(fronts.expected([1, 0, 0]), [1.005, 0.005, 0.005])
    np.testing.assert_allclose(
        fronts.expected([0.75, 0.25, 0]), [0.755, 0.255, 0.005]
    )  # linear in lambda here
    np.testing.assert_allclose(fronts.expected([0.2, 0.5, 0.3], "base"), [0.005] * 3)


def test_slider_move_moves_the_highlighted_point(session):
    _, fig_a = app.on_sliders(session, "helpful", "harmless", False, 1, 0, 0)
    _, fig_b = app.on_sliders(session, "helpful", "harmless", False, 0, 1, 0)
    cur_a = next(t for t in fig_a.data if t.name == CURRENT)
    cur_b = next(t for t in fig_b.data if t.name == CURRENT)
    assert (cur_a.x[0], cur_a.y[0]) == pytest.approx((1.005, 0.005))
    assert (cur_b.x[0], cur_b.y[0]) == pytest.approx((0.005, 1.005))
    names = [t.name for t in fig_a.data]
    assert {"hoe", "rs", "base"} <= set(names) and LIVE not in names
    _, fig_3d = app.on_sliders(session, "helpful", "harmless", True, 1, 1, 1)
    assert fig_3d.data[0].type == "scatter3d"
    _, fig_axes = app.on_sliders(session, "humor", "harmless", False, 0, 0, 1)
    cur = next(t for t in fig_axes.data if t.name == CURRENT)
    assert (cur.x[0], cur.y[0]) == pytest.approx((1.005, 0.005))  # x is humor now


def test_steer_streams_then_reports_rewards_and_the_live_point(session):
    outputs = list(
        app.on_steer(session, "tell me a joke", 8, 0.0, 0, "helpful", "harmless", False, 0.2, 0.5, 0.3)
    )
    assert len(outputs) >= 2
    text, rewards_md, figure, state = outputs[-1]
    assert text and "Rewards (raw)" in rewards_md and "first token" in rewards_md
    assert LIVE in [t.name for t in figure.data]
    assert state["answer"] == text and state["preference"] == pytest.approx([0.2, 0.5, 0.3])
    heat = app.on_inspect(session, state)
    z = np.array(heat.data[0].z)
    assert z.shape[0] == 3 and z.shape[1] >= 1  # experts x answer tokens
    np.testing.assert_allclose(z.sum(0), 1.0, atol=1e-4)  # gates are a distribution over experts


def test_compare_streams_every_method(session):
    seen = {m: 0 for m in COMPARE_METHODS}
    for answers in session.compare("hello", [1, 1, 0], session.decoding(6, 0.0, 0)):
        for a in answers:
            seen[a.method] += bool(a.text) and not a.done  # a partial answer was shown
    assert all(n >= 1 for n in seen.values()), seen  # shown while generating, not only when finished


def test_compare_gives_one_answer_per_method(session):
    outputs = list(app.on_compare(session, "hello", 6, 1, 1, 0))
    *texts, table, figure = outputs[-1]
    assert len(texts) == len(COMPARE_METHODS) and all(isinstance(t, str) for t in texts)
    for m in COMPARE_METHODS:
        assert f"| {m} |" in table
    assert figure is not None and sum(t.name.endswith(" answer") for t in figure.data) == len(COMPARE_METHODS)


def test_fronts_must_match_the_bundle(tmp_path):
    folder = synthetic_fronts(tmp_path / "f")
    with pytest.raises(ValueError, match="objectives"):
        find_fronts(folder, ["a", "b", "c"], "fp32")
    assert find_fronts(tmp_path / "none", OBJECTIVES, "fp32") is None


def test_api_endpoints_through_gradio_client(session):
    from gradio_client import Client

    demo = app.build_demo(session)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
        assert {"/generate", "/compare", "/front"} <= names
        text, rewards_md, _ = client.predict(  # the gr.State output stays on the server
            "hello", 6, 0.0, 0, "helpful", "harmless", False, 1, 0, 0, api_name="/generate"
        )
        assert text and "Rewards" in rewards_md
        *texts, table, _ = client.predict("hello", 6, 1, 1, 0, api_name="/compare")
        assert len(texts) == len(COMPARE_METHODS) and "| mod |" in table
        front = client.predict(1, 0, 0, api_name="/front")
        assert front["expected"]["helpful"] == pytest.approx(1.005)
    finally:
        demo.close()
