"""Load and interference: concurrent users of the launched app never share a mixture (each
answer equals the same request's answer alone), and a client that goes away stops its
generation and frees its slot.

The full-size load test is a documented command (README, "Reliability"):

    python -m hoe_core.ui.loadtest --bundle assets/smollm2-hhh --users 8 --requests 10

Here it runs on the pico bundle in-process, and on the shipped bundle at CI size
(``HOE_LOAD_USERS`` x ``HOE_LOAD_REQUESTS``, default 4 x 2, 8 new tokens).
"""

import os
import threading
import time
from pathlib import Path

import pytest

import app
from hoe_core.config import DecodingConfig
from hoe_core.generation import active_generations, generate, stream
from hoe_core.ui import loadtest
from hoe_core.ui.session import Session

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "smollm2-hhh"
OBJECTIVES = ["helpful", "harmless", "humor"]
VIEW = ("helpful", "harmless", False)


@pytest.fixture(scope="module")
def session(pico_bundle):
    return Session.load(pico_bundle, "fp32", device="cpu", with_rewards=False)


def wait_for(condition, deadline_s=120.0):
    """Poll until ``condition()`` holds; bounded, so a hang fails instead of blocking CI."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.02)


def test_stream_ends_like_generate_and_closing_it_stops_the_generation(session):
    hoe, tok = session.loaded.hoe, session.tokenizer
    decoding = DecodingConfig(max_new_tokens=12, repetition_penalty=1.2)
    texts = list(stream(hoe, tok, "tell me a joke", [0.2, 0.5, 0.3], decoding))
    assert len(texts) >= 2  # one item per token
    assert texts[-1].strip() == generate(hoe, tok, ["tell me a joke"], [[0.2, 0.5, 0.3]], decoding)[0].text

    steps = []
    hook = hoe.model.register_forward_pre_hook(lambda *_: steps.append(1))
    eos = hoe.model.generation_config.eos_token_id
    hoe.model.generation_config.eos_token_id = None  # it would run all 4096 tokens
    try:
        pieces = stream(hoe, tok, "hi", [1, 1, 1], DecodingConfig(max_new_tokens=4096))
        for _ in range(3):
            next(pieces)
        assert active_generations() == 1
        pieces.close()  # the consumer goes away
        wait_for(lambda: active_generations() == 0)
        stopped_at = len(steps)
        time.sleep(0.2)
        assert len(steps) == stopped_at < 50  # stopped within a token or two, not at 4096
    finally:
        hook.remove()
        hoe.model.generation_config.eos_token_id = eos


def test_concurrent_users_get_what_they_get_alone_pico(session):
    lam_a, lam_b = [1, 0, 0], [0, 0, 1]
    a, b = (list(app.on_steer(session, "hello", 8, 0.0, 0, *VIEW, *lam))[-1][0] for lam in (lam_a, lam_b))
    assert a != b  # preferences change the answer, so a shared mixture would show
    demo = app.serve(session, port=None, concurrency=3, prevent_thread_lock=True, quiet=True)
    try:
        report = loadtest.run_load(
            demo.local_url, OBJECTIVES, users=3, requests=2, max_new_tokens=8, timeout=120
        )
    finally:
        demo.close()
    assert report["failures"] == [] and report["mismatches"] == [] and report["ok"]
    assert report["requests"] == 6 and report["distinct_answers"] > 1
    for key in ("latency_alone_s", "latency_concurrent_s", "queue_wait_concurrent_s"):
        assert report[key]["p50"] is not None and report[key]["p95"] >= report[key]["p50"]
    text = loadtest.report_markdown(report)
    assert "failed requests          0" in text and "PASS" in text


def test_the_load_test_refuses_anything_but_loopback():
    with pytest.raises(ValueError, match="only talks to loopback"):
        loadtest.run_load("http://example.com:7860/", OBJECTIVES, users=1, requests=1)


def test_a_client_that_disconnects_stops_its_generation_and_frees_its_slot(session):
    from gradio_client import Client

    hoe = session.loaded.hoe
    steps = []
    hook = hoe.model.register_forward_pre_hook(lambda *_: steps.append(time.sleep(0.01)))
    eos = hoe.model.generation_config.eos_token_id
    hoe.model.generation_config.eos_token_id = None  # every request runs to max_new_tokens
    demo = app.serve(session, port=None, concurrency=1, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        job = client.submit("hi", 256, 0.0, 0, "helpful", "harmless", False, 1, 1, 1, api_name="/generate")
        wait_for(lambda: len(steps) >= 10 and len(job.outputs()) >= 2)  # streaming, mid-answer
        job.cancel()
        wait_for(lambda: active_generations() == 0)
        stopped_at = len(steps)
        assert stopped_at < 200  # the whole answer would take 256 forwards
        # the only slot (concurrency 1) is free again: the next request is served
        text, _, _ = client.predict(
            "hi", 4, 0.0, 0, "helpful", "harmless", False, 1, 1, 1, api_name="/generate"
        )
        assert isinstance(text, str) and len(steps) == stopped_at + 4
    finally:
        demo.close()
        hook.remove()
        hoe.model.generation_config.eos_token_id = eos


def test_two_sampled_users_at_once_get_their_own_seeded_answers(session):
    """Sampling draws from torch's global RNG: each call holds it seeded, so two users
    sampling at the same time get exactly what they get alone."""
    hoe, tok = session.loaded.hoe, session.tokenizer
    configs = [DecodingConfig(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=s) for s in (1, 2)]
    alone = [list(stream(hoe, tok, "hi", [1, 1, 1], c))[-1] for c in configs]
    assert alone[0] != alone[1]
    results = [None, None]
    barrier = threading.Barrier(2)

    def user(i):
        barrier.wait()
        results[i] = list(stream(hoe, tok, "hi", [1, 1, 1], configs[i]))[-1]

    threads = [threading.Thread(target=user, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone


@pytest.mark.integration
def test_load_on_the_shipped_bundle_at_ci_size(tmp_path):
    """The app launched as ``python app.py --bundle assets/smollm2-hhh`` (nf4), 4 users x 2
    requests at once (CI size; ``HOE_LOAD_USERS`` / ``HOE_LOAD_REQUESTS`` scale it)."""
    assert (SHIPPED / "manifest.json").is_file(), f"no shipped bundle at {SHIPPED}"
    users = int(os.environ.get("HOE_LOAD_USERS", 4))
    requests = int(os.environ.get("HOE_LOAD_REQUESTS", 2))
    out = tmp_path / "load.json"
    code = loadtest.main(
        ["--bundle", str(SHIPPED), "--users", str(users), "--requests", str(requests)]
        + ["--max-new-tokens", "8", "--json", str(out), "--log", str(tmp_path / "app.log")]
    )
    report = __import__("json").loads(out.read_text())
    assert code == 0 and report["ok"], report
    assert report["requests"] == users * requests and report["failures"] == [] and report["mismatches"] == []


def test_a_full_queue_refuses_at_once_instead_of_waiting_unboundedly(session):
    from gradio_client import Client

    hoe = session.loaded.hoe
    hook = hoe.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    eos = hoe.model.generation_config.eos_token_id
    hoe.model.generation_config.eos_token_id = None  # each request runs all 256 tokens (> 2.5 s)
    demo = app.serve(session, port=None, concurrency=1, max_queue=1, prevent_thread_lock=True, quiet=True)
    jobs = []
    try:
        inputs = ("hi", 256, 0.0, 0, "helpful", "harmless", False, 1, 1, 1)
        clients = [Client(demo.local_url, verbose=False) for _ in range(3)]
        jobs.append(clients[0].submit(*inputs, api_name="/generate"))
        wait_for(lambda: active_generations() == 1)  # the one slot is busy
        jobs.append(clients[1].submit(*inputs, api_name="/generate"))  # waits in the queue
        wait_for(lambda: jobs[1].status().code.value == "IN_QUEUE")
        full = clients[2].submit(*inputs, api_name="/generate")
        with pytest.raises(Exception, match="(?i)queue is full"):
            full.result(timeout=60)
    finally:
        for job in jobs:
            job.cancel()
        wait_for(lambda: active_generations() == 0)
        demo.close()
        hook.remove()
        hoe.model.generation_config.eos_token_id = eos
