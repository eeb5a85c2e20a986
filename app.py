"""HoE demo: one slider per objective -> preference router -> live streaming generation.

A first, small version of the app (the full app with Pareto plots, the comparison and
inside tabs is tracked in its own issue). It loads a bundle once and shares the model;
each request carries its own preference, so concurrent users never mix.

    python app.py [--bundle DIR] [--precision nf4|int8|bf16|fp32] [--port 7860]

Without --bundle it uses ``$HOE_BUNDLE``, else ``assets/smollm2-hhh`` when shipped, else
a pico bundle (tiny random model) built into ``build-cache/pico``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from hoe_core.bundle import LoadedBundle, load_bundle  # noqa: E402
from hoe_core.config import APP_PRECISION, DecodingConfig  # noqa: E402
from hoe_core.generation import stream  # noqa: E402
from hoe_core.routing.preference import normalize_preference  # noqa: E402

ROOT = Path(__file__).resolve().parent
SHIPPED = ROOT / "assets" / "smollm2-hhh"
EXAMPLES = [
    "What is the capital of France?",
    "Tell me a joke about computers.",
    "How can I get revenge on my neighbour?",
]


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


def describe_weights(loaded: LoadedBundle, sliders: list[float]) -> str:
    """Markdown: the normalised preference and the anchors the router picked."""
    lam = normalize_preference(sliders, len(loaded.objectives))
    weights = loaded.hoe.anchor_weights([lam])[0].tolist()
    names = loaded.hoe.expert_names + [r.name for r in loaded.hoe.routers]
    pref = " · ".join(f"**{o}** {v:.2f}" for o, v in zip(loaded.objectives, lam))
    active = " · ".join(f"{n} {w:.2f}" for n, w in zip(names, weights) if w > 0)
    return f"Preference: {pref}  \nActive experts/routers: {active}"


def build_demo(loaded: LoadedBundle, load_seconds: float = 0.0) -> gr.Blocks:
    """The Blocks app over one loaded bundle. Event functions are plain and testable."""
    counts = loaded.hoe.parameter_counts()
    status = (
        f"Bundle **{loaded.manifest.name}** · backbone `{loaded.manifest.backbone['spec']}` · "
        f"{loaded.backbone.precision} on {loaded.backbone.device} · "
        f"{loaded.hoe.n_experts} LoRA experts ({counts['experts']:,} params) · "
        f"{len(loaded.hoe.routers)} routers ({counts['routers']:,} params) · loaded in {load_seconds:.1f} s"
    )
    defaults = loaded.manifest.decoding_config

    def on_generate(prompt, max_new_tokens, temperature, seed, *sliders):
        try:
            lam = normalize_preference(sliders, len(loaded.objectives))
            decoding = DecodingConfig(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=defaults.top_p,
                repetition_penalty=defaults.repetition_penalty,
                seed=int(seed),
            )
            yield from stream(loaded.hoe, loaded.backbone.tokenizer, prompt, lam, decoding)
        except ValueError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="HoE: steer an LLM across objectives") as demo:
        gr.Markdown("# HoE — hierarchical experts for multi-objective alignment")
        gr.Markdown(status)
        with gr.Row():
            with gr.Column():
                sliders = [
                    gr.Slider(0, 1, value=1 / len(loaded.objectives), step=0.01, label=o)
                    for o in loaded.objectives
                ]
                weights_md = gr.Markdown(describe_weights(loaded, [s.value for s in sliders]))
                prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], lines=3)
                gr.Examples(EXAMPLES, inputs=prompt)
                with gr.Accordion("Decoding", open=False):
                    max_new = gr.Slider(1, 256, value=defaults.max_new_tokens, step=1, label="max new tokens")
                    temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="temperature")
                    seed = gr.Number(value=defaults.seed, precision=0, label="seed")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=12)
        inputs = [prompt, max_new, temperature, seed, *sliders]
        for s in sliders:
            s.change(lambda *v: describe_weights(loaded, v), sliders, weights_md, api_name=False)
            s.release(on_generate, inputs, answer, api_name=False)
        button.click(on_generate, inputs, answer, api_name="generate")
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "int8", "nf4"])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    args = parser.parse_args()
    bundle, precision = default_bundle() if args.bundle is None else (args.bundle, APP_PRECISION)
    start = time.perf_counter()
    loaded = load_bundle(bundle, precision=args.precision or precision)
    demo = build_demo(loaded, time.perf_counter() - start)
    host = "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"
    demo.queue().launch(server_name=host, server_port=args.port, share=False)


if __name__ == "__main__":
    main()
