"""Bad input, row by row, through every door: the Python API, the CLI and the app's event
functions (and, for what the API can carry, the launched app through gradio_client).

Each refusal names the field and its allowed range; the app raises it as a ``gr.Error``
and keeps serving. Rows that are not errors (a single huge preference value, a 20,000
character prompt, control characters) are served, and the user is told what was done.
"""

import math

import gradio as gr
import pytest

import app
from hoe_core.config import APP_MAX_NEW_TOKENS, MAX_PROMPT_CHARS, SEED_MAX, DecodingConfig
from hoe_core.generation import check_prompt, generate
from hoe_core.routing.preference import ALLOWED
from hoe_core.ui.session import Session
from tests.test_cli import run

NAN, INF = float("nan"), float("inf")
VIEW = ("helpful", "harmless", False)  # x axis, y axis, 3-D


@pytest.fixture(scope="module")
def session(pico_bundle):
    return Session.load(pico_bundle, "fp32", device="cpu", with_rewards=False)


def steer(session, prompt="hi", max_new_tokens=4, temperature=0.0, seed=0, sliders=(1, 1, 1)):
    """The app's Generate event, run to the end: its last output."""
    return list(app.on_steer(session, prompt, max_new_tokens, temperature, seed, *VIEW, *sliders))[-1]


def cli_generate(bundle, *extra, prompt="hi", preference="1,1,1", check=False):
    args = ["generate", "--bundle", str(bundle), f"--prompt={prompt}", f"--preference={preference}"]
    return run(*args, "--max-new-tokens=4", "--json", *extra, check=check)


def api_generate(session, prompt="hi", preference=(1, 1, 1), decoding=DecodingConfig(max_new_tokens=4)):
    loaded = session.loaded
    return generate(loaded.hoe, loaded.backbone.tokenizer, [prompt], [list(preference)], decoding)[0]


# ----------------------------------------------------------------------------- preference

BAD_PREFERENCES = [  # (row, values, CLI text, message)
    ("wrong length", [1, 0], "1,0", "preference needs 3 values (one per objective), got 2"),
    ("negative", [1, -1, 1], "1,-1,1", f"preference values must be >= 0 ({ALLOWED})"),
    ("NaN", [NAN, 1, 1], "nan,1,1", f"preference values must be finite ({ALLOWED})"),
    ("inf", [INF, 1, 1], "inf,1,1", f"preference values must be finite ({ALLOWED})"),
    ("overflow to inf", [1e999, 1, 1], "1e999,1,1", f"preference values must be finite ({ALLOWED})"),
    ("all zeros", [0, 0, 0], "0,0,0", f"preference values must not all be zero ({ALLOWED})"),
    ("non-numeric", ["a", 1, 1], "a,1,1", "preference must be numbers"),
]
ROW_IDS = [row[0] for row in BAD_PREFERENCES]


@pytest.mark.parametrize("row, values, cli_text, message", BAD_PREFERENCES, ids=ROW_IDS)
def test_bad_preference_python_api(session, row, values, cli_text, message):
    with pytest.raises(ValueError) as err:
        api_generate(session, preference=values)
    assert message in str(err.value)


@pytest.mark.parametrize("row, values, cli_text, message", BAD_PREFERENCES, ids=ROW_IDS)
def test_bad_preference_cli(pico_bundle, row, values, cli_text, message):
    proc = cli_generate(pico_bundle, preference=cli_text)
    assert proc.returncode == 2 and proc.stdout == ""
    if row == "non-numeric":  # refused while parsing the arguments, naming the option
        assert "argument --preference: expected comma-separated numbers" in proc.stderr
    else:
        assert f"error: {message}" in proc.stderr


@pytest.mark.parametrize("row, values, cli_text, message", BAD_PREFERENCES, ids=ROW_IDS)
def test_bad_preference_app_events(session, row, values, cli_text, message):
    with pytest.raises(gr.Error, match="preference") as err:
        steer(session, sliders=values)
    assert message in str(err.value)
    with pytest.raises(gr.Error) as err:
        app.on_front(session, *values)
    assert message in str(err.value)
    assert message in app.on_sliders(session, *VIEW, *values)[0]  # shown beside the sliders


def test_single_huge_preference_value_is_normalised_not_overflowed(session, pico_bundle):
    huge = [1e308, 1e308, 1]  # the plain sum overflows to inf
    out = api_generate(session, preference=huge)
    assert out.preference == pytest.approx([0.5, 0.5, 0.0]) and math.fsum(out.preference) == 1
    assert api_generate(session, preference=[1e308, 1, 1]).preference == pytest.approx([1, 0, 0])
    payload = __import__("json").loads(
        cli_generate(pico_bundle, preference="1e308,1e308,1", check=True).stdout
    )
    assert payload["preference"] == pytest.approx({"helpful": 0.5, "harmless": 0.5, "humor": 0.0})
    text, rewards_md, _, state = steer(session, sliders=huge)
    assert state["preference"] == pytest.approx([0.5, 0.5, 0.0]) and "Preference" not in rewards_md
    assert "**helpful** 0.50" in app.describe_weights(session, huge)


# ----------------------------------------------------------------------------- prompt

PROMPT_ERRORS = [  # (row, prompt for the API, prompt for the CLI / app, message)
    ("empty", "", "", "prompt is empty; allowed: 1 to 4,000 characters of UTF-8 text"),
    ("whitespace only", " \n\t  ", " \n\t  ", "prompt is empty; allowed: 1 to 4,000 characters"),
    # argv and JSON carry undecodable bytes as lone surrogates (Python's surrogateescape)
    ("invalid UTF-8", b"caf\xe9 ok", "caf\udce9 ok", "prompt is not valid UTF-8 (byte 0xe9 at"),
    ("only control characters", "\x00\x07\x1b", "\x00\x07\x1b", "prompt is empty"),
]


@pytest.mark.parametrize(
    "row, api_prompt, text_prompt, message", PROMPT_ERRORS, ids=[r[0] for r in PROMPT_ERRORS]
)
def test_bad_prompt_every_door(session, pico_bundle, row, api_prompt, text_prompt, message):
    with pytest.raises(ValueError) as err:
        api_generate(session, prompt=api_prompt)
    assert message in str(err.value)
    proc = cli_generate(pico_bundle, prompt=text_prompt)
    assert proc.returncode == 2 and f"error: {message}" in proc.stderr
    with pytest.raises(gr.Error) as err:
        steer(session, prompt=text_prompt)
    assert message in str(err.value)
    with pytest.raises(gr.Error) as err:
        list(app.on_compare(session, text_prompt, 4, 1, 1, 1))
    assert message in str(err.value)


def test_invalid_utf8_bytes_from_a_real_command_line(pico_bundle):
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "hoe_core", "generate", "--bundle", str(pico_bundle)]
        + ["--prompt", b"caf\xe9", "--preference", "1,1,1"],
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "LC_ALL": "C.UTF-8"},
        timeout=300,
    )
    assert proc.returncode == 2
    assert b"error: prompt is not valid UTF-8 (byte 0xe9 at character 3)" in proc.stderr


LONG = "Tell me a joke. " * 1250  # 20,000 characters
CUT_NOTE = f"prompt cut to its first {MAX_PROMPT_CHARS:,} of 20,000 characters"


def test_long_prompt_is_capped_and_the_user_is_told(session, pico_bundle):
    assert len(LONG) == 20_000
    out = api_generate(session, prompt=LONG)
    assert out.prompt == LONG[:MAX_PROMPT_CHARS] and any(CUT_NOTE in n for n in out.notes)
    proc = cli_generate(pico_bundle, prompt=LONG, check=True)
    assert f"note: {CUT_NOTE}" in proc.stderr
    assert any(CUT_NOTE in n for n in __import__("json").loads(proc.stdout)["notes"])
    text, rewards_md, _, state = steer(session, prompt=LONG)
    assert CUT_NOTE in rewards_md and len(state["prompt"]) == MAX_PROMPT_CHARS
    *_, table, _ = list(app.on_compare(session, LONG, 2, 1, 1, 1))[-1]
    assert CUT_NOTE in table
    assert api_generate(session, prompt=LONG[:MAX_PROMPT_CHARS]).notes == []  # at the limit: no note


def test_control_characters_are_dropped_and_said(session, pico_bundle):
    raw = "tell\x00 me\x07 a\x1b[0m joke\r\n\tplease\r"
    clean, notes = check_prompt(raw)
    assert clean == "tell me a[0m joke\n\tplease"  # \x00 \x07 \x1b and the lone \r gone; CRLF -> LF
    assert notes == ["dropped 4 control characters from the prompt"]
    assert api_generate(session, prompt=raw).prompt == clean
    assert "note: dropped 4 control characters" in cli_generate(pico_bundle, prompt=raw, check=True).stderr
    _, rewards_md, _, state = steer(session, prompt=raw)
    assert state["prompt"] == clean and "dropped 4 control characters" in rewards_md


def test_a_clean_prompt_gets_no_notes(session):
    assert api_generate(session, prompt="What is the capital of France?").notes == []


# ----------------------------------------------------------------------------- decoding

LIMIT = DecodingConfig.MAX_NEW_TOKENS_LIMIT
BAD_DECODING = [  # (row, DecodingConfig kwargs, CLI option, message)
    (
        "max_new_tokens 0",
        {"max_new_tokens": 0},
        "--max-new-tokens=0",
        f"max_new_tokens must be in [1, {LIMIT}]",
    ),
    (
        "max_new_tokens -1",
        {"max_new_tokens": -1},
        "--max-new-tokens=-1",
        f"max_new_tokens must be in [1, {LIMIT}]",
    ),
    (
        "max_new_tokens 1e9",
        {"max_new_tokens": 10**9},
        "--max-new-tokens=1000000000",
        f"max_new_tokens must be in [1, {LIMIT}], got 1000000000",
    ),
    (
        "temperature < 0",
        {"temperature": -0.5},
        "--temperature=-0.5",
        "temperature must be in [0.0, 10.0], got -0.5",
    ),
    ("top_p > 1", {"top_p": 1.5}, "--top-p=1.5", "top_p must be in (0, 1], got 1.5"),
    ("seed 1.5", {"seed": 1.5}, "--seed=1.5", f"seed must be an integer in [0, {SEED_MAX}], got 1.5"),
    ("seed text", {"seed": "abc"}, "--seed=abc", f"seed must be an integer in [0, {SEED_MAX}], got 'abc'"),
    ("seed -1", {"seed": -1}, "--seed=-1", f"seed must be in [0, {SEED_MAX}], got -1"),
]


@pytest.mark.parametrize("row, kwargs, option, message", BAD_DECODING, ids=[r[0] for r in BAD_DECODING])
def test_bad_decoding_python_api_and_cli(pico_bundle, row, kwargs, option, message):
    with pytest.raises(ValueError) as err:
        DecodingConfig(**kwargs)
    assert message in str(err.value)
    proc = run(
        "generate", "--bundle", str(pico_bundle), "--prompt=hi", "--preference=1,1,1", option, check=False
    )
    assert proc.returncode == 2 and proc.stdout == ""
    if row.startswith("seed") and row != "seed -1":  # argparse refuses it, naming the option
        assert "argument --seed: invalid int value" in proc.stderr
    else:
        assert f"error: {message}" in proc.stderr


BAD_APP_DECODING = [  # (row, max_new_tokens, temperature, seed, message)
    ("max_new_tokens 0", 0, 0.0, 0, f"max_new_tokens must be in [1, {APP_MAX_NEW_TOKENS}] in the app, got 0"),
    ("max_new_tokens -1", -1, 0.0, 0, f"max_new_tokens must be in [1, {APP_MAX_NEW_TOKENS}] in the app"),
    ("max_new_tokens 1e9", 1e9, 0.0, 0, f"max_new_tokens must be in [1, {APP_MAX_NEW_TOKENS}] in the app"),
    ("max_new_tokens 2.5", 2.5, 0.0, 0, "max_new_tokens must be an integer, got 2.5"),
    ("temperature < 0", 4, -0.5, 0, "temperature must be in [0.0, 10.0], got -0.5"),
    ("temperature text", 4, "hot", 0, "temperature must be a finite number, got 'hot'"),
    ("seed 1.5", 4, 0.0, 1.5, "seed must be an integer, got 1.5"),
    ("seed text", 4, 0.0, "abc", "seed must be an integer, got 'abc'"),
    ("seed None", 4, 0.0, None, "seed must be an integer, got None"),
]


@pytest.mark.parametrize(
    "row, max_new_tokens, temperature, seed, message", BAD_APP_DECODING, ids=[r[0] for r in BAD_APP_DECODING]
)
def test_bad_decoding_app_events(session, row, max_new_tokens, temperature, seed, message):
    with pytest.raises(gr.Error) as err:
        steer(session, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    assert message in str(err.value)
    if temperature == 0.0 and seed == 0:  # Compare takes max_new_tokens only
        with pytest.raises(gr.Error) as err:
            list(app.on_compare(session, "hi", max_new_tokens, 1, 1, 1))
        assert message in str(err.value)


def test_integral_floats_are_accepted_where_integers_are_due(session):
    decoding = session.decoding(8.0, 0, "3")
    assert (decoding.max_new_tokens, decoding.seed, decoding.temperature) == (8, 3, 0.0)


# ----------------------------------------------------------------------------- the launched app

API_ERRORS = [  # (row, generate inputs after the prompt, message); gradio checks widget ranges first
    ("preference negative", (4, 0.0, 0, *VIEW, -1, 1, 1), "helpful must be a number in [0, 1], got -1"),
    ("preference huge", (4, 0.0, 0, *VIEW, 1, 1e308, 1), "harmless must be a number in [0, 1], got 1e+308"),
    ("preference text", (4, 0.0, 0, *VIEW, 1, 1, "x"), "humor must be a number in [0, 1], got 'x'"),
    (
        "preference all zeros",
        (4, 0.0, 0, *VIEW, 0, 0, 0),
        f"preference values must not all be zero ({ALLOWED})",
    ),
    (
        "max_new_tokens 0",
        (0, 0.0, 0, *VIEW, 1, 1, 1),
        f"max new tokens must be an integer in [1, {APP_MAX_NEW_TOKENS}]",
    ),
    ("max_new_tokens 1e9", (10**9, 0.0, 0, *VIEW, 1, 1, 1), "max new tokens must be an integer in [1, 256]"),
    ("temperature < 0", (4, -0.5, 0, *VIEW, 1, 1, 1), "temperature must be a number in [0, 2], got -0.5"),
    ("seed 1.5", (4, 0.0, 1.5, *VIEW, 1, 1, 1), f"seed must be an integer in [0, {SEED_MAX}], got 1.5"),
    ("seed text", (4, 0.0, "abc", *VIEW, 1, 1, 1), "seed must be an integer in [0, "),
]


def raw_call(url: str, api_name: str, data: list) -> str:
    """The app's HTTP API without gradio_client (JSON escapes reach the server as they are):
    the event stream of one call, as text."""
    import json

    import httpx

    base = url.rstrip("/") + "/gradio_api/call/" + api_name
    body = json.dumps({"data": data})  # ensure_ascii: a lone surrogate travels as an escape
    event_id = httpx.post(base, content=body, headers={"content-type": "application/json"}).json()["event_id"]
    return httpx.get(f"{base}/{event_id}", timeout=60).text


@pytest.fixture(scope="module")
def client(session):
    from gradio_client import Client

    demo = app.serve(session, port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_launched_app_refuses_bad_input_by_field_and_keeps_serving(client):
    from gradio_client.exceptions import AppError

    for row, inputs, message in API_ERRORS:
        with pytest.raises(AppError) as err:
            client.predict("hi", *inputs, api_name="/generate")
        assert message in str(err.value), row
    with pytest.raises(AppError) as err:
        client.predict("   ", 4, 0.0, 0, *VIEW, 1, 1, 1, api_name="/generate")
    assert "prompt is empty; allowed: 1 to 4,000 characters" in str(err.value)
    # gradio_client cannot even encode a lone surrogate; a raw JSON client can send "\\udce9"
    event = raw_call(client.src, "generate", ["caf\udce9", 4, 0.0, 0, *VIEW, 1, 1, 1])
    assert "event: error" in event and "prompt is not valid UTF-8 (byte 0xe9 at character 3)" in event
    with pytest.raises(AppError, match=r"max new tokens must be an integer in \[1, 256\], got 0"):
        client.predict("hi", 0, 1, 1, 1, api_name="/compare")
    with pytest.raises(AppError, match=r"helpful must be a number in \[0, 1\]"):
        client.predict(2, 0, 0, api_name="/front")
    # still serving, and a 20,000-character prompt is cut with a note in the answer's readout
    text, rewards_md, _ = client.predict(LONG, 4, 0.0, 0, *VIEW, 1, 1, 1, api_name="/generate")
    assert isinstance(text, str) and CUT_NOTE in rewards_md
    assert client.predict(1, 0, 0, api_name="/front")["preference"]["helpful"] == 1.0
