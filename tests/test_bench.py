"""The benchmark's machinery on the pico bundle: every method is measured, ratios and the
report come out, RS's re-merged weights are the same model as the unmerged soup, and MOD
decodes a fixed length when asked. (Speed itself is never asserted here: the benchmark
measures it.)"""

import os
from contextlib import nullcontext
from functools import partial

import numpy as np
import pytest
import torch

from hoe_core.bench import (
    BenchConfig,
    fresh_preferences,
    markdown_report,
    median_interval,
    memory_bandwidth,
    run_bench,
)
from hoe_core.bundle import load_bundle


def test_bench_measures_every_method_and_reports_targets(pico_bundle):
    cfg = BenchConfig(
        bundle=str(pico_bundle),
        precisions=("fp32",),
        methods=("hoe", "mod", "rs", "merge-ties"),
        new_tokens=3,
        batch=2,
        repeats=1,
        pair_repeats=1,
        isolate=False,
    )
    results = run_bench(cfg, log=lambda *_: None)
    (fp32,) = results["precisions"]
    assert fp32["error"] is None
    methods = fp32["methods"]
    assert list(methods) == ["backbone", "hoe", "mod", "rs", "merge-ties"]
    for name, r in methods.items():
        assert r["single_tok_s"] > 0 and r["batch_tok_s"] > 0, name
        assert 0 < r["first_token_s"] and 0 < r["switch_first_token_s"], name
        assert r["peak_rss_mib"] > 0 and r["weight_mib"] > 0, name
    assert methods["rs"]["switch_overhead_s"] > 0  # RS pays a re-merge on every change
    for name in ("backbone", "hoe", "rs", "merge-ties"):  # timed again at the unchanged preference
        cost = methods[name]["switch_cost"]
        assert methods[name]["unchanged_first_token_s"] > 0 and cost["n"] == 2 and cost["median"] > 0
    assert methods["mod"]["switch_cost"] is None  # MOD has no state to change: nothing to compare
    assert methods["merge-ties"]["switch_overhead_s"] > 0  # recomputes its dense deltas on a change
    assert "active anchors" in methods["hoe"]["note"]
    params = fp32["params"]
    assert (
        params["experts"] > 0 and params["routers"] > 0 and params["n_full_models"] == 3 * params["backbone"]
    )
    names = {t["target"] for t in results["targets"]}
    assert len(names) == 4 and all(t["precision"] == "fp32" for t in results["targets"])
    hoe_vs_base = next(t for t in results["targets"] if t["target"].startswith("HoE / backbone"))
    assert hoe_vs_base["value"] == pytest.approx(
        methods["hoe"]["single_tok_s"] / methods["backbone"]["single_tok_s"]
    )
    for t in results["targets"]:  # HoE's ratios to the backbone come with their paired rounds
        if t["target"].startswith(("HoE / backbone", "HoE preference change")):
            q = t["paired"]
            assert q["n"] == (1 if "decode" in t["target"] else 2)  # switch: lambda2, then lambda
            assert q["low"] is None and q["high"] is None  # one round: no interval pretended
        else:
            assert "paired" not in t
    (switch,) = [t for t in results["targets"] if t["target"].startswith("HoE preference change")]
    assert switch["flop_ratio"] == pytest.approx(fp32["params"]["prefill_flop_ratio"])
    assert switch["flop_ratio"] > 1
    assert sum("flop_ratio" in t for t in results["targets"]) == 1  # the first-token target's yardstick
    report = markdown_report(results, "python -m hoe_core bench --test")
    assert "(n=1: too few for an interval)" in report and "(n=2: too few for an interval)" in report
    assert "## fp32" in report and "| merge-ties |" in report and "## Targets" in report
    assert "python -m hoe_core bench --test" in report
    assert f"| {switch['flop_ratio']:.2f} | ≤ 1.1 |" in report
    bound = methods["backbone"]["bytes_per_token_mib"] / methods["hoe"]["bytes_per_token_mib"]
    assert 0 < bound < 1 and f"could decode at most {bound:.3f}x as fast as the backbone" in report
    assert "## Preference switch cost" in report and "| fp32 | hoe | " in report
    assert "| fp32 | mod | " not in report.split("## Preference switch cost")[1]
    code = results["code"]  # the commit measured (this test runs in a checkout or a clean clone)
    assert code["git_commit"] is None or f"Code: commit {code['git_commit'][:10]} (" in report


def test_median_interval_narrows_with_agreeing_rounds():
    same = median_interval([0.9] * 15)
    assert same == {"median": 0.9, "low": 0.9, "high": 0.9, "level": 0.9, "n": 15}
    assert median_interval([0.8, 0.9, 1.0, 0.95])["low"] is None  # too few to bootstrap
    rng = np.random.default_rng(1)
    noisy, noisier = 0.9 + 0.02 * rng.standard_normal(15), 0.9 + 0.2 * rng.standard_normal(15)
    a, b = median_interval(noisy), median_interval(noisier)
    assert a["low"] <= a["median"] <= a["high"] and b["low"] <= b["median"] <= b["high"]
    assert a["high"] - a["low"] < b["high"] - b["low"]
    assert median_interval(noisy) == a  # seeded: reproducible from the same rounds


def test_bench_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="precisions"):
        BenchConfig(precisions=("fp8",))
    with pytest.raises(ValueError, match="unknown bench methods"):
        BenchConfig(methods=("hoe", "soup"))
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        BenchConfig(new_tokens=1)
    with pytest.raises(ValueError, match="repeats must be an integer"):
        BenchConfig(repeats=0)
    with pytest.raises(ValueError, match="pair_repeats must be an integer"):
        BenchConfig(pair_repeats=0)


def test_memory_bandwidth_is_a_positive_rate():
    assert memory_bandwidth(mib=8, repeats=2) > 0


def test_merged_soup_weights_equal_the_unmerged_soup(pico_bundle):
    from hoe_core.backbone import load_backbone
    from hoe_core.baselines.merge import single_factors
    from hoe_core.baselines.soups import MergedSoup, mixture_weights, vertex_experts

    loaded = load_bundle(pico_bundle, device="cpu")
    hoe = loaded.hoe
    bare = load_backbone(loaded.manifest.backbone["spec"], "fp32", "cpu", base_dir=loaded.root).model
    soup = MergedSoup(bare, single_factors(hoe, loaded.experts))
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    lam = np.array([0.5, 0.2, 0.3])
    assert soup.set_preference(lam) > 0
    with torch.no_grad(), hoe.routing(anchor_weights=mixture_weights(hoe, vertex_experts(hoe), lam, 1)):
        unmerged = hoe.model(input_ids=ids).logits
    with torch.no_grad():
        merged = bare(input_ids=ids).logits
        plain = hoe.model(input_ids=ids).logits  # outside routing: the bare backbone
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert (merged - plain).abs().max() > 1e-4  # the experts do change the model
    soup.set_preference([1.0, 0.0, 0.0])  # re-merging starts from the pre-trained weights
    with (
        torch.no_grad(),
        hoe.routing(anchor_weights=mixture_weights(hoe, vertex_experts(hoe), np.eye(3)[0], 1)),
    ):
        expert = hoe.model(input_ids=ids).logits
    torch.testing.assert_close(bare(input_ids=ids).logits, expert, atol=1e-5, rtol=1e-4)


def test_merged_soup_refuses_quantised_layers():
    from hoe_core.baselines.soups import MergedSoup
    from hoe_core.experts.task_svd import LowRankDelta

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.uint8), requires_grad=False)

    model = torch.nn.Module()
    model.proj = Packed()
    with pytest.raises(ValueError, match="proj: Rewarded Soups re-merges float weights"):
        MergedSoup(model, [{"proj": LowRankDelta(torch.zeros(4, 1), torch.zeros(1, 2))}])


def test_mod_min_new_tokens_suppresses_eos(pico_bundle):
    from hoe_core.baselines.mod import mod_steps
    from hoe_core.config import DecodingConfig

    loaded = load_bundle(pico_bundle, device="cpu")
    decoding = DecodingConfig(max_new_tokens=5, temperature=0.0)
    steps = list(
        mod_steps(loaded.hoe, loaded.backbone.tokenizer, ["hi"], [0.3, 0.3, 0.4], decoding, min_new_tokens=5)
    )
    assert len(steps) == 5
    eos = loaded.backbone.tokenizer.eos_token_id
    assert not (steps[-1] == eos).any()


@pytest.mark.parametrize(
    "code, line",
    [
        ({"git_commit": "0123456789abcdef", "git_dirty": False}, "Code: commit 0123456789 (clean tree)."),
        (
            {"git_commit": "0123456789abcdef", "git_dirty": True},
            "(uncommitted changes in hoe_core/ or configs/).",
        ),
        ({"git_commit": None, "git_dirty": None}, "Code: not a git checkout."),
    ],
)
def test_the_report_names_the_code_it_measured(code, line):
    from hoe_core.bench import _code_line

    assert line in _code_line(code)


def test_backbone_and_hoe_are_timed_interleaved(pico_bundle, monkeypatch):
    """Their ratio is a target: single-stream and switch runs alternate between the two, so
    a shared machine's drift lands on both (batched runs follow, one method at a time)."""
    import hoe_core.bench as bench

    real, calls = bench._generate_timed, []

    def spy(model, enc, new_tokens, routing):
        calls.append((model, enc["input_ids"].shape[0], new_tokens))
        return real(model, enc, new_tokens, routing)

    monkeypatch.setattr(bench, "_generate_timed", spy)
    cfg = BenchConfig(
        bundle=str(pico_bundle),
        precisions=("fp32",),
        methods=("hoe",),
        new_tokens=3,
        batch=2,
        repeats=2,
        pair_repeats=3,
        isolate=False,  # the spy sees this process only
    )
    run_bench(cfg, log=lambda *_: None)
    models = list(dict.fromkeys(m for m, _, _ in calls))
    assert len(models) == 2  # the bare backbone, then HoE's model
    single = [models.index(m) for m, rows, n in calls if rows == 1 and n == 3]
    switch = [models.index(m) for m, rows, n in calls if rows == 1 and n == 2]
    assert single == [0, 1] * 4  # a warm-up round, then pair_repeats = 3 rounds
    # lambda2, lambda, three times; each method's change, then the same call unchanged
    assert switch == [0, 0, 1, 1] * 6
    batched = [models.index(m) for m, rows, _ in calls if rows == 2]
    assert batched == [0] * 3 + [1] * 3  # warm-up + 2 repeats each, one method after the other


def test_each_precision_is_measured_in_a_fresh_process(pico_bundle, capfd):
    """By default no precision is measured beside what an earlier one's methods left in the
    process (the full bench's later precisions had read slower than when run alone)."""
    import os

    cfg = BenchConfig(
        bundle=str(pico_bundle),
        precisions=("fp32", "bf16"),
        methods=("hoe",),
        new_tokens=2,
        batch=1,
        repeats=1,
        pair_repeats=1,
    )
    results = run_bench(cfg)
    pids = [p["pid"] for p in results["precisions"]]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    for p in results["precisions"]:
        assert p["error"] is None and list(p["methods"]) == ["backbone", "hoe"]
        assert p["methods"]["hoe"]["single_tok_s"] > 0
    assert [t["precision"] for t in results["targets"]] == ["fp32"] * 3 + ["bf16"] * 3  # no MOD: 3 each
    out = capfd.readouterr().out
    assert "precision bf16 (fresh process)" in out
    assert "  bf16  hoe " in out  # the child's own progress lines reach the terminal
    assert "each precision ran in a fresh process" in markdown_report(results, "bench")


def test_isolated_bench_reports_bad_input_from_the_child(tmp_path):
    from hoe_core.bundle import BundleError

    with pytest.raises(BundleError, match="missing does not exist") as raised:
        run_bench(BenchConfig(bundle=str(tmp_path / "missing"), precisions=("fp32",)))
    (note,) = raised.value.__notes__  # raised in the child, seen here with the child's traceback
    assert note.startswith("raised in the bench's child process for fp32:") and "load_bundle" in note


def _exit_in_child(parent: int, *_args) -> None:
    """A log that kills any process but ``parent`` at its first line (a crashing child)."""
    if os.getpid() != parent:
        os._exit(9)


def test_a_child_that_dies_becomes_an_error_entry_and_the_run_goes_on(pico_bundle):
    cfg = BenchConfig(bundle=str(pico_bundle), precisions=("fp32", "bf16"), methods=("hoe",), new_tokens=2)
    results = run_bench(cfg, log=partial(_exit_in_child, os.getpid()))
    assert [(p["precision"], p["error"], p["pid"]) for p in results["precisions"]] == [
        ("fp32", "the process measuring it died (exit code 9)", None),
        ("bf16", "the process measuring it died (exit code 9)", None),
    ]
    assert results["targets"] == []  # nothing measured, nothing claimed
    with pytest.raises(ValueError, match="log must pickle"):
        run_bench(BenchConfig(precisions=("fp32",)), log=lambda *_: None)


def test_shuffled_rounds_run_every_arm_once_a_round_after_a_warm_up(pico_bundle, monkeypatch):
    """The A/B scripts' loop: each round every arm once, in a shuffled order; round 0 not kept."""
    import hoe_core.bench as bench

    loaded = load_bundle(pico_bundle)
    hoe, tok = loaded.hoe, loaded.backbone.tokenizer
    enc = tok(["hi"], return_tensors="pt")
    routed = [partial(hoe.routing, anchor_weights=hoe.anchor_weights([w])) for w in ((1, 0, 0), (0, 1, 0))]
    arms = {"a": (hoe.model, nullcontext), "b": (hoe.model, routed[0]), "c": (hoe.model, routed[1])}
    real, calls = bench._generate_timed, []
    monkeypatch.setattr(
        bench, "_generate_timed", lambda m, e, n, ctx: calls.append(ctx) or real(m, e, n, ctx)
    )
    decode, first = bench.shuffled_rounds(arms, enc, rounds=4, new_tokens=3, seed=1)
    assert len(calls) == 3 * 5  # a warm-up round, then four
    orders = [calls[i : i + 3] for i in range(0, 15, 3)]
    assert all(sorted(map(id, o)) == sorted(id(c) for _, c in arms.values()) for o in orders)
    assert len({tuple(map(id, o)) for o in orders}) > 1  # shuffled, not one fixed order
    assert (
        {k: len(v) for k, v in decode.items()}
        == {k: len(v) for k, v in first.items()}
        == dict.fromkeys(arms, 4)
    )
    assert all(x > 0 for v in (*decode.values(), *first.values()) for x in v)


@pytest.fixture(scope="module")
def uneven_bundle(tmp_path_factory):
    """A pico bundle whose router covers two of the three experts and whose third expert
    touches only q and v: live sets that differ from layer to layer."""
    from hoe_core.pico import build_pico_bundle

    return build_pico_bundle(
        tmp_path_factory.mktemp("uneven") / "pico", router_size=2, last_expert_targets=("q_proj", "v_proj")
    )


@pytest.mark.parametrize("bundle", ["pico_bundle", "uneven_bundle"])
@pytest.mark.parametrize(
    "preference", [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1 / 3, 1 / 3, 1 / 3), (0.5, 0.3, 0.2), (0.2, 0.2, 0.6)]
)
def test_prefill_flops_match_what_the_forward_computes(request, bundle, monkeypatch, preference):
    """The first-token FLOP ratio's multiply-adds equal torch's own count of the prefill's GEMMs:
    the backbone's linear layers, and what HoE adds at the preference (an expert alone, the
    router, mixes), also where the router covers a subset and an expert misses layers."""
    from torch.utils.flop_counter import FlopCounterMode

    from hoe_core.backbone import load_backbone
    from hoe_core.bench import prefill_flops

    monkeypatch.delenv("HOE_FUSED_CPU", raising=False)  # gating compiled: no torch GEMM of its own
    loaded = load_bundle(request.getfixturevalue(bundle), device="cpu")
    hoe = loaded.hoe
    bare = load_backbone(loaded.manifest.backbone["spec"], "fp32", "cpu", base_dir=loaded.root).model
    ids = torch.randint(0, 256, (1, 11))
    weights = hoe.anchor_weights([preference])

    def in_place_addmm(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # y.addmm_(h, B^T): the deltas' GEMMs

    def counted(model, routing) -> int:
        count = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: in_place_addmm})
        with torch.no_grad(), routing(), count as fc:
            model(input_ids=ids, logits_to_keep=1)
        return fc.get_total_flops()

    base = counted(bare, nullcontext)
    with_hoe = counted(hoe.model, partial(hoe.routing, anchor_weights=weights))
    flops = prefill_flops(hoe, bare, weights[0].numpy(), ids.shape[1])
    assert flops["hoe"] > 0
    assert with_hoe - base == 2 * flops["hoe"]  # attention and rotary cancel out
    # the backbone: its linear layers, the output embedding once (a counter that also counts
    # attention scores counts a little more)
    assert 2 * flops["backbone"] <= base <= 1.1 * 2 * flops["backbone"]
    assert flops["ratio"] == pytest.approx(1 + flops["hoe"] / flops["backbone"])


def test_every_switch_goes_to_a_preference_not_seen_before():
    """So HoE's per-preference kernels are built anew on each change, as a slider move would."""
    lam2, lam = np.array([0.2, 0.3, 0.5]), np.array([0.4, 0.3, 0.3])
    prefs = fresh_preferences(lam2, lam, 15)
    assert len(prefs) == 30 and len({tuple(p) for p in prefs}) == 30
    for i, p in enumerate(prefs):
        near = lam2 if i % 2 == 0 else lam
        assert p.sum() == pytest.approx(1) and (p >= 0).all() and np.abs(p - near).max() < 0.01


@pytest.mark.parametrize("fused", [True, False])
def test_hoe_bytes_per_token_count_what_the_decode_step_reads(pico_bundle, monkeypatch, fused):
    """The roofline's bytes for HoE: the live factors and gate weights at 2 bytes each where the
    compiled decode step keeps float32 copies of float16 values as float16 (the bundle stores
    float16), at 4 where the step is off; the gate biases as stored."""
    from hoe_core.bench import _live_bytes, decode_element_size

    monkeypatch.setenv("HOE_FUSED_CPU", "1" if fused else "0")
    hoe = load_bundle(pico_bundle, device="cpu").hoe
    layers = list(hoe.layers.values())
    assert layers[0].lora_A.dtype == torch.float32
    active = np.ones(hoe.n_experts + len(layers[0].subsets), bool)  # every expert and router live
    factors = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers)
    gates = sum(g.weight.numel() for layer in layers for g in layer.gates)
    biases = sum(g.bias.nbytes for layer in layers for g in layer.gates)
    size = 2 if fused else 4
    assert decode_element_size(hoe) == size
    assert _live_bytes(hoe, active) == (factors + gates) * size + biases
    if fused:  # what the compiled step packed at a decode step: float16 bits, in every group
        with torch.no_grad(), hoe.routing(anchor_weights=hoe.anchor_weights([[0.4, 0.3, 0.3]])):
            hoe.model(torch.randint(0, 256, (1, 1)))
        packed = [s.factors for layer in layers for s in layer.group.stacks.values()]
        assert packed and all(f is not None and f.flat.dtype == np.int16 for f in packed)
        layers[0].lora_A[0, 0] += 1e-4  # a value float16 cannot hold: the step keeps float32
        assert decode_element_size(hoe) == 4
