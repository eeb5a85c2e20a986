"""HoE demo: one slider per objective -> preference router -> live streaming generation,
beside the Pareto fronts of HoE and its baselines.

    python app.py [--bundle DIR] [--precision nf4|int8|bf16|fp32] [--port 7860]
                  [--host 127.0.0.1] [--concurrency 2] [--max-queue 32]

Without --bundle it uses ``$HOE_BUNDLE``, else ``assets/smollm2-hhh`` when shipped, else
a pico bundle (tiny random model) built into ``build-cache/pico``. Fronts come from
``precomputed_fronts/<bundle name>/``. Tabs: Steer, Compare, Inside, About.

Event functions are plain functions of a :class:`~hoe_core.ui.session.Session` and the
widget values, so they are tested without a browser; ``build_demo`` only wires them.

Safety defaults: binds 127.0.0.1 unless on Spaces (``SPACE_ID``) or given ``--host``; never
a share link; bad input of any event (UI or API) is a ``gr.Error`` naming the field and
its allowed range, and the app keeps serving; prompts are capped at MAX_PROMPT_CHARS (the
user is told); the log has one line per request without the prompt's text
(``HOE_LOG_PROMPTS=1`` adds it); a client that goes away stops its generation.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import sys
import time
from contextlib import closing
from functools import partial
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from hoe_core.config import APP_MAX_NEW_TOKENS, APP_PRECISION, PRECISIONS, SEED_MAX  # noqa: E402
from hoe_core.generation import check_prompt  # noqa: E402
from hoe_core.ui.plots import gate_heatmap, pareto_figure  # noqa: E402
from hoe_core.ui.session import COMPARE_METHODS, Session  # noqa: E402

try:  # on Hugging Face ZeroGPU Spaces, generation runs on a GPU; locally a no-op
    import spaces

    gpu = spaces.GPU
except ImportError:  # pragma: no cover - the package only exists on Spaces

    def gpu(fn):
        return fn


log = logging.getLogger("hoe.app")

ROOT = Path(__file__).resolve().parent
SHIPPED = ROOT / "assets" / "smollm2-hhh"
FRONTS = ROOT / "precomputed_fronts"
DIAGRAM = ROOT / "assets" / "hoe-diagram.svg"
EXAMPLES = [
    "What is the capital of France?",
    "Tell me a joke about computers.",
    "How can I get revenge on my neighbour?",
]
ABOUT = """
**HoE (Hierarchical Mixture-of-Experts)** steers one LLM across several objectives at
inference time, with no retraining. Each objective's fine-tune becomes a *LoRA expert* by
task-SVD; merging them at a few anchor preferences gives *multi-objective experts*; small
*router experts*, trained with a Tchebycheff objective, mix LoRA experts token by token.
For your preference λ, the parameter-free *preference router* picks the nearest anchors
and their convex weights, and the model generates in one pass. Baselines: Rewarded Soups
(interpolate the experts' weights), MOD (mix the experts' next-token log-probabilities,
one forward per expert) and training-free merging (TA / TIES at λ).
"""


def default_bundle() -> tuple[Path, str]:
    """(bundle folder, default precision) when none is given."""
    if os.environ.get("HOE_BUNDLE"):
        return Path(os.environ["HOE_BUNDLE"]), APP_PRECISION
    if (SHIPPED / "manifest.json").is_file():
        return SHIPPED, APP_PRECISION
    pico = ROOT / "build-cache" / "pico"
    if not (pico / "manifest.json").is_file():
        from hoe_core.pico import build_pico_bundle

        build_pico_bundle(pico)
    return pico, "fp32"


# ----------------------------------------------------------------------------- inputs


def _checked_number(label, payload, minimum, maximum, integer=False):
    """A widget value from the UI or the API, or a gr.Error naming the field and its range."""
    kind = "an integer" if integer else "a number"
    ok = isinstance(payload, (int, float)) and not isinstance(payload, bool) and math.isfinite(payload)
    if ok and integer:
        ok = float(payload).is_integer()
    if not ok or not minimum <= payload <= maximum:
        raise gr.Error(f"{label} must be {kind} in [{minimum}, {maximum}], got {payload!r}")
    return int(payload) if integer else payload


def checked(component, integer: bool = False):
    """Check this Slider's / Number's input, from the UI or the API, with a message naming
    the field and its range (gradio's own says only "Value 2 is greater than maximum value
    1", fails on text and rounds 1.5 to an integer silently). Set on the instance: a
    subclass would make gradio write a ``.pyi`` stub next to this file."""

    def preprocess(payload):
        return _checked_number(component.label, payload, component.minimum, component.maximum, integer)

    component.preprocess = preprocess
    return component


def log_request(event: str, prompt: str, lam, decoding, answer: str, seconds: float) -> None:
    """One log line per request: sizes, preference, settings, time; the prompt's text only
    with HOE_LOG_PROMPTS=1."""
    text = f" prompt={prompt!r}" if os.environ.get("HOE_LOG_PROMPTS") == "1" else ""
    log.info(
        "%s: prompt %d chars, preference %s, max_new_tokens %d, temperature %g, answer %d chars, %.2f s%s",
        event,
        len(prompt),
        [round(float(x), 3) for x in lam],
        decoding.max_new_tokens,
        decoding.temperature,
        len(answer),
        seconds,
        text,
    )


def _notices(notes: list[str]) -> str:
    """Notes about the prompt (cut, characters dropped): a toast each, and markdown lines."""
    for note in notes:
        gr.Warning(note)
    return "".join(f"  \n⚠️ {note}" for note in notes)


# ----------------------------------------------------------------------------- events


def describe_weights(session: Session, sliders) -> str:
    """Markdown: the normalised preference and the anchors the router picked."""
    lam = session.preference(sliders)
    pref = " · ".join(f"**{o}** {v:.2f}" for o, v in zip(session.objectives, lam))
    active = " · ".join(f"{n} {w:.2f}" for n, w in session.router_weights(lam))
    return f"Preference: {pref}  \nActive experts/routers: {active}"


def describe_rewards(session: Session, rewards) -> str:
    if rewards is None:
        return "_No reward models loaded._"
    unit = "normalised" if session.normalizers else "raw"
    cells = " · ".join(f"**{o}** {r:+.2f}" for o, r in zip(session.objectives, rewards))
    return f"Rewards ({unit}): {cells}"


def _axes(session: Session, x_name, y_name, three_d) -> list[int]:
    objs = session.objectives
    if three_d and len(objs) >= 3:
        return [0, 1, 2]
    x = objs.index(x_name) if x_name in objs else 0
    y = objs.index(y_name) if y_name in objs else 1
    if x == y:
        y = (x + 1) % len(objs)
    return [x, y]


def front_figure(session: Session, sliders, x_name=None, y_name=None, three_d=False, live=None):
    """The Pareto plot at the current preference (None when no fronts are shipped)."""
    if session.fronts is None:
        return None
    lam = session.preference(sliders)
    return pareto_figure(session.fronts, _axes(session, x_name, y_name, three_d), lam, live)


def on_sliders(session: Session, x_name, y_name, three_d, *sliders):
    """Slider moved: the weights readout and the plot's highlighted point follow."""
    try:
        return describe_weights(session, sliders), front_figure(session, sliders, x_name, y_name, three_d)
    except ValueError as err:
        return f"⚠️ {err}", gr.skip()


@gpu
def on_steer(session: Session, prompt, max_new_tokens, temperature, seed, x_name, y_name, three_d, *sliders):
    """Stream HoE's answer; when done, its rewards and its point on the plot.

    Yields (answer, rewards markdown, figure, last answer state). Closing it (the client
    went away) stops the generation."""
    try:
        lam = session.preference(sliders)
        decoding = session.decoding(max_new_tokens, temperature, seed)
        prompt, notes = check_prompt(prompt)
        notice = _notices(notes)
        text, start, first = "", time.perf_counter(), None
        with closing(session.steer(prompt, lam, decoding)) as pieces:
            for text in pieces:
                first = first or time.perf_counter() - start
                yield text, "_generating…_" + notice, gr.skip(), gr.skip()
        seconds = time.perf_counter() - start
        log_request("generate", prompt, lam, decoding, text, seconds)
        rewards = session.score(prompt, text)
        latency = f"  \nfirst token {first or 0:.2f} s · total {seconds:.2f} s"
        figure = front_figure(session, lam, x_name, y_name, three_d, rewards)
        state = {"prompt": prompt, "answer": text, "preference": lam.tolist()}
        yield text, describe_rewards(session, rewards) + latency + notice, figure, state
    except ValueError as err:
        raise gr.Error(str(err)) from None


def compare_table(session: Session, answers) -> str:
    head = "| method | " + " | ".join(session.objectives) + " | latency | tokens/s |\n"
    head += "|---|" + "---|" * (len(session.objectives) + 2) + "\n"
    rows = []
    for a in answers:
        rewards = (
            " | ".join(f"{r:+.2f}" for r in a.rewards)
            if a.rewards
            else " | ".join("…" for _ in session.objectives)
        )
        speed = f"{a.seconds:.1f} s | {a.tokens_per_second:.1f}" if a.done else "… | …"
        rows.append(f"| {a.method} | {rewards} | {speed} |")
    return head + "\n".join(rows)


@gpu
def on_compare(session: Session, prompt, max_new_tokens, *sliders):
    """HoE, RS, MOD and base on one prompt and one λ. Yields (answers..., table, figure)."""
    try:
        lam = session.preference(sliders)
        decoding = session.decoding(max_new_tokens, 0.0, 0)
        prompt, notes = check_prompt(prompt)
        notice = _notices(notes)
        start, answers = time.perf_counter(), []
        with closing(session.compare(prompt, lam, decoding)) as steps:
            for answers in steps:
                figure = gr.skip()
                if all(a.done for a in answers) and session.fronts is not None:
                    figure = compare_figure(session, lam, answers)
                yield *[a.text for a in answers], compare_table(session, answers) + notice, figure
        log_request(
            "compare", prompt, lam, decoding, answers[0].text if answers else "", time.perf_counter() - start
        )
    except ValueError as err:
        raise gr.Error(str(err)) from None


def compare_figure(session: Session, lam, answers):
    """The fronts with each compared method's answer as a marker (first two objectives)."""
    import plotly.graph_objects as go

    fig = pareto_figure(session.fronts, [0, 1], lam)
    for a in answers:
        if a.rewards:
            fig.add_trace(
                go.Scatter(
                    x=[a.rewards[0]],
                    y=[a.rewards[1]],
                    mode="markers+text",
                    text=[a.method],
                    textposition="top center",
                    name=f"{a.method} answer",
                    marker={"symbol": "x", "size": 12},
                )
            )
    return fig


def on_inspect(session: Session, last):
    """Token x expert heatmap of the router gates for the last Steer answer."""
    if not last:
        raise gr.Error("Generate an answer in the Steer tab first.")
    try:
        tokens, gates, experts = session.gates(last["prompt"], last["answer"], last["preference"])
    except ValueError as err:
        raise gr.Error(str(err)) from None
    return gate_heatmap(tokens, gates, experts)


def on_front(session: Session, *sliders) -> dict:
    """API: HoE's expected rewards at λ from the precomputed grid, and each method's hypervolume."""
    try:
        lam = session.preference(sliders)
    except ValueError as err:
        raise gr.Error(str(err)) from None
    preference = dict(zip(session.objectives, lam.tolist()))
    if session.fronts is None:
        return {"preference": preference, "expected": None, "hypervolume": {}}
    expected = session.fronts.expected(lam)
    return {
        "preference": preference,
        "expected": dict(zip(session.objectives, expected.tolist())),
        "hypervolume": {m: f.hypervolume for m, f in session.fronts.methods.items()},
        "precision": session.fronts.precision,
    }


def status_line(session: Session) -> str:
    loaded = session.loaded
    counts = loaded.hoe.parameter_counts()
    return (
        f"Bundle **{loaded.manifest.name}** · backbone `{loaded.manifest.backbone['spec']}` · "
        f"{loaded.backbone.precision} on {loaded.backbone.device} · "
        f"{loaded.hoe.n_experts} LoRA experts ({counts['experts']:,} params) · "
        f"{len(loaded.hoe.routers)} routers ({counts['routers']:,} params) · "
        f"loaded in {session.load_seconds:.1f} s"
        + ("" if session.fronts else " · no precomputed fronts for this bundle")
    )


def manifest_summary(session: Session) -> str:
    m = session.loaded.manifest
    lines = [
        f"**{m.name}** · objectives: {', '.join(m.objectives)}",
        "",
        "| expert | kind | anchor |",
        "|---|---|---|",
    ]
    lines += [f"| {e.name} | {e.kind} | {[round(x, 2) for x in e.anchor]} |" for e in m.experts]
    lines += ["", "| router | anchor | over |", "|---|---|---|"]
    lines += [f"| {r.name} | {[round(x, 2) for x in r.anchor]} | {', '.join(r.experts)} |" for r in m.routers]
    return "\n".join(lines)


def cost_table(session: Session) -> str:
    counts = session.loaded.hoe.parameter_counts()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        f"Parameters: backbone {counts['backbone']:,} · LoRA experts {counts['experts']:,} "
        f"({100 * counts['experts'] / counts['backbone']:.1f}%) · routers {counts['routers']:,}. "
        f"Peak memory of this process: {rss:.0f} MiB.",
    ]
    timing = session.fronts.timing if session.fronts else {}
    if timing:
        lines += ["", "| method | answers / min (precomputed fronts) |", "|---|---|"]
        lines += [f"| {m} | {t.get('per_minute') or '–'} |" for m, t in timing.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- layout


def max_new_tokens_slider(defaults) -> gr.Slider:
    """The max-new-tokens control (Steer and Compare tabs), capped at APP_MAX_NEW_TOKENS."""
    return gr.Slider(
        1,
        APP_MAX_NEW_TOKENS,
        value=min(defaults.max_new_tokens, APP_MAX_NEW_TOKENS),
        step=1,
        label="max new tokens",
    )


def build_demo(session: Session) -> gr.Blocks:
    """The Blocks app over one session. Named API endpoints: generate, compare, front."""
    objs = session.objectives
    defaults = session.loaded.manifest.decoding_config
    start = [1 / len(objs)] * len(objs)
    with gr.Blocks(title="HoE: steer an LLM across objectives") as demo:
        gr.Markdown("# HoE — hierarchical experts for multi-objective alignment")
        gr.Markdown(status_line(session), elem_id="status")
        last = gr.State(None)
        with gr.Tab("Steer"):
            with gr.Row():
                with gr.Column(scale=1):
                    sliders = [
                        checked(gr.Slider(0, 1, value=v, step=0.01, label=o, elem_id=f"w-{o}"))
                        for o, v in zip(objs, start)
                    ]
                    weights_md = gr.Markdown(describe_weights(session, start), elem_id="weights")
                    prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], lines=3, elem_id="prompt")
                    gr.Examples(EXAMPLES, inputs=prompt)
                    with gr.Accordion("Decoding", open=False):
                        max_new = checked(max_new_tokens_slider(defaults), integer=True)
                        temperature = checked(
                            gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="temperature")
                        )
                        seed = checked(
                            gr.Number(
                                value=defaults.seed, precision=0, minimum=0, maximum=SEED_MAX, label="seed"
                            ),
                            integer=True,
                        )
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                    answer = gr.Textbox(label="Answer", lines=8, elem_id="answer")
                    rewards_md = gr.Markdown("", elem_id="rewards")
                with gr.Column(scale=1):
                    with gr.Row():
                        x_axis = gr.Dropdown(objs, value=objs[0], label="x axis")
                        y_axis = gr.Dropdown(objs, value=objs[1], label="y axis")
                        three_d = gr.Checkbox(False, label="3-D", visible=len(objs) >= 3)
                    plot = gr.Plot(
                        front_figure(session, start, objs[0], objs[1]), label="Pareto fronts", elem_id="plot"
                    )
        view = [x_axis, y_axis, three_d]
        steer_inputs = [prompt, max_new, temperature, seed, *view, *sliders]
        steer_outputs = [answer, rewards_md, plot, last]
        for s in sliders:
            s.change(partial(on_sliders, session), [*view, *sliders], [weights_md, plot], api_name=False)
            s.release(partial(on_steer, session), steer_inputs, steer_outputs, api_name=False)
        for v in view:
            v.change(partial(on_sliders, session), [*view, *sliders], [weights_md, plot], api_name=False)
        button.click(partial(on_steer, session), steer_inputs, steer_outputs, api_name="generate")
        prompt.submit(partial(on_steer, session), steer_inputs, steer_outputs, api_name=False)

        with gr.Tab("Compare"):
            gr.Markdown("One prompt and one preference (the Steer tab's sliders), every method, greedy.")
            c_prompt = gr.Textbox(label="Prompt", value=EXAMPLES[1], lines=2)
            c_max = checked(max_new_tokens_slider(defaults), integer=True)
            c_button = gr.Button("Compare", variant="primary")
            with gr.Row():
                c_answers = [gr.Textbox(label=m, lines=8) for m in COMPARE_METHODS]
            c_table = gr.Markdown()
            c_plot = gr.Plot(label="answers on the fronts")
        c_button.click(
            partial(on_compare, session),
            [c_prompt, c_max, *sliders],
            [*c_answers, c_table, c_plot],
            api_name="compare",
        )

        with gr.Tab("Inside"):
            i_button = gr.Button("Show the router gates of the last answer")
            heatmap = gr.Plot(label="token × expert gates (mean over layers)")
            gr.Markdown(manifest_summary(session))
            gr.Markdown(cost_table(session))
        i_button.click(partial(on_inspect, session), [last], heatmap, api_name=False)

        with gr.Tab("About"):
            gr.Markdown(ABOUT)
            if DIAGRAM.is_file():
                gr.HTML(DIAGRAM.read_text(encoding="utf-8"))
        front_json = gr.JSON(visible=False)
        gr.Button(visible=False).click(partial(on_front, session), sliders, front_json, api_name="front")
    return demo


def launch_options(host: str | None, port: int | None, environ=os.environ) -> dict:
    """``launch`` keyword arguments: loopback unless on Spaces or asked; never a share link."""
    if host is None:
        host = "0.0.0.0" if environ.get("SPACE_ID") else "127.0.0.1"
    return {"server_name": host, "server_port": port, "share": False}


def serve(
    session: Session,
    host: str | None = None,
    port: int | None = None,
    concurrency: int = 2,
    max_queue: int = 32,
    **launch_kwargs,
) -> gr.Blocks:
    """Build the app and launch it: ``concurrency`` requests of an event run at once
    (users share the model, never a mixture), up to ``max_queue`` more wait in the queue;
    beyond that a request is refused ("queue is full") rather than waiting unboundedly."""
    if concurrency < 1 or max_queue < 1:
        raise ValueError(f"concurrency and max_queue must be >= 1, got {concurrency}, {max_queue}")
    demo = build_demo(session).queue(default_concurrency_limit=concurrency, max_size=max_queue)
    demo.launch(**launch_options(host, port), **launch_kwargs)
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--precision", default=None, choices=PRECISIONS)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    parser.add_argument(
        "--host", default=None, help="interface to bind (default 127.0.0.1; 0.0.0.0 on Spaces)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=int(os.environ.get("HOE_CONCURRENCY", 2)),
        help="requests generating at once (default 2)",
    )
    parser.add_argument("--max-queue", type=int, default=32, help="requests waiting at most (default 32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    bundle, precision = default_bundle() if args.bundle is None else (args.bundle, APP_PRECISION)
    precision = args.precision or precision
    try:
        session = Session.load(bundle, precision, fronts_dir=FRONTS / Path(bundle).name)
        serve(session, args.host, args.port, args.concurrency, args.max_queue)
    except (ValueError, FileNotFoundError, KeyError) as err:  # BundleError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
