"""The HoE layer and model against references: plain peft at a vertex, per-expert loops,
row-by-row batches, generation without the KV cache, quantised backbones."""

import threading

import numpy as np
import pytest
import torch
from peft import PeftModel
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from hoe_core.experts.adapters import save_lora_adapter
from hoe_core.pico import random_experts, random_router
from hoe_core.routing.layer import HoELinear
from hoe_core.routing.model import HoEModel
from tests.conftest import trainable_gates

PREFS = [[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.4, 0.6]]


def _hoe(model, experts, with_router=True):
    routers = [random_router(model, "center", np.full(3, 1 / 3), experts, k=3, seed=5)] if with_router else []
    return HoEModel(model, ["a", "b", "c"], experts, routers)


def _ids(seq=7, batch=1, seed=0):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _mixture(layer, x, w):
    """The layer's output by the formula, with torch ops on the gates as they are (no kernel):
    base(x) + ((A x) * g[owner]) B^T, g (B, T, E) from ``expert_gates``."""
    g = layer.expert_gates(x, w)
    return layer.base(x) + ((x @ layer.lora_A.T) * g[..., layer.owner]) @ layer.lora_B.T


@pytest.mark.parametrize("vertex", [0, 1, 2])
def test_vertex_equals_backbone_plus_that_expert_in_plain_peft(
    pico_model, pico_dir, three_experts, tmp_path, vertex
):
    save_lora_adapter(three_experts[vertex].factors, tmp_path / "e", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(pico_dir), dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(base, str(tmp_path / "e")).eval()
    hoe = _hoe(pico_model, three_experts)
    ids = _ids(batch=2)
    pref = np.eye(3)[vertex]
    with torch.no_grad(), hoe.routing([pref, pref]):
        got = hoe.model(ids).logits
    with torch.no_grad():
        want = reference(ids).logits
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_routing_the_model_is_the_bare_backbone(pico_model, pico_dir, three_experts):
    base = AutoModelForCausalLM.from_pretrained(str(pico_dir), dtype=torch.float32).eval()
    hoe = _hoe(pico_model, three_experts)
    ids = _ids()
    with torch.no_grad():
        assert_close(hoe.model(ids).logits, base(ids).logits)


def test_gates_sum_to_one_per_token_and_routers_are_used(pico_model, three_experts):
    hoe = _hoe(pico_model, three_experts)
    with torch.no_grad(), hoe.routing([[0.2, 0.5, 0.3]], record_gates=True) as r:
        hoe.model(_ids(seq=9))
    assert set(r.gates) == set(hoe.layers)
    for steps in r.gates.values():
        g = steps[0]  # (1, 9, 3)
        assert g.shape == (1, 9, 3)
        assert_close(g.sum(-1), torch.ones(1, 9))
        assert g.std(dim=1).max() > 0  # token-dependent: the router is active


def test_layer_matches_per_expert_loop_and_skips_zero_weight_experts():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    factors = [(torch.randn(12, r), torch.randn(r, 16)) for r in (2, 3, 4)]
    layer = HoELinear(base, "x", factors, routers=[([0, 2], torch.randn(2, 16), torch.randn(2))])
    x = torch.randn(2, 5, 16)
    weights = torch.tensor([[0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0]])  # expert 1 unused
    from hoe_core.routing.context import use_routing

    with use_routing(weights):
        got = layer(x)
    probs = torch.softmax(layer.gates[0](x), -1)  # (2, 5, 2)
    g = torch.zeros(2, 5, 3)
    g[..., 0] += weights[:, None, 0]
    g[..., 2] += weights[:, None, 2]
    g[..., [0, 2]] += weights[:, None, None, 3] * probs
    want = base(x) + sum(g[..., e : e + 1] * (x @ a.T @ b.T) for e, (b, a) in enumerate(factors))
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mixed_preferences_in_one_batch_equal_rows_one_by_one(pico_model, three_experts):
    hoe = _hoe(pico_model, three_experts)
    ids = _ids(batch=3, seed=3)
    with torch.no_grad(), hoe.routing(PREFS):
        batch = hoe.model(ids).logits
    for i, pref in enumerate(PREFS):
        with torch.no_grad(), hoe.routing([pref]):
            assert_close(batch[i : i + 1], hoe.model(ids[i : i + 1]).logits, atol=1e-5, rtol=1e-5)


def test_batched_generate_with_padding_equals_rows(pico_model, pico_tokenizer, three_experts):
    from hoe_core.config import DecodingConfig
    from hoe_core.generation import generate

    hoe = _hoe(pico_model, three_experts)
    prompts = ["hi", "tell me a joke please", "how?"]
    dec = DecodingConfig(max_new_tokens=12, repetition_penalty=1.0)
    batch = generate(hoe, pico_tokenizer, prompts, PREFS, dec)
    for i, (p, pref) in enumerate(zip(prompts, PREFS)):
        alone = generate(hoe, pico_tokenizer, [p], [pref], dec)[0]
        assert batch[i].text == alone.text


def test_generate_with_kv_cache_equals_without(pico_model, three_experts):
    hoe = _hoe(pico_model, three_experts)
    ids = _ids(batch=2, seed=4)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=256)
    with torch.no_grad(), hoe.routing(PREFS[1:]):
        cached = hoe.model.generate(ids, use_cache=True, **kw)
        uncached = hoe.model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == ids.shape[1] + 16


def test_concurrent_threads_never_see_each_others_mixture(pico_model, three_experts):
    hoe = _hoe(pico_model, three_experts)
    ids = _ids(seed=6)
    alone = {}
    for i, p in enumerate(PREFS):
        with torch.no_grad(), hoe.routing([p]):
            alone[i] = hoe.model(ids).logits
    results, barrier = {}, threading.Barrier(len(PREFS))

    def user(i):
        with torch.no_grad(), hoe.routing([PREFS[i]]):
            barrier.wait()
            out = []
            for _ in range(5):
                out.append(hoe.model(ids).logits)
            results[i] = out

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(PREFS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in alone:
        for logits in results[i]:
            assert_close(logits, alone[i], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def quantisable_pico_dir(tmp_path_factory):
    """A pico Llama whose layers bitsandbytes' CPU 4-bit kernel can pack: on CPUs with
    bfloat16 units it stores weights in tiles of 32 output rows and 64-column blocks (hidden
    32 fails there with a reshape error; CPUs without them take another path)."""
    from hoe_core.pico import save_pico_backbone

    return save_pico_backbone(tmp_path_factory.mktemp("pico64") / "backbone", hidden=64, intermediate=128)


@pytest.mark.parametrize("precision", ["nf4", "int8"])
def test_quantised_hoe_layers_run_and_stay_close_to_fp32(quantisable_pico_dir, precision):
    from hoe_core.backbone import load_backbone

    fp32 = load_backbone(str(quantisable_pico_dir), "fp32", "cpu")
    quant = load_backbone(str(quantisable_pico_dir), precision, "cpu")
    three_experts = random_experts(fp32.model, np.eye(3), rank=4, seed=1)
    assert quant.fingerprint == fp32.fingerprint  # identity does not depend on precision
    layer_type = type(quant.model.model.layers[0].self_attn.q_proj).__name__
    assert layer_type == {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[precision]
    ref, hoe = _hoe(fp32.model, three_experts), _hoe(quant.model, three_experts)
    assert isinstance(quant.model.model.layers[0].self_attn.q_proj, HoELinear)
    ids = _ids(batch=2, seed=8)
    with torch.no_grad(), ref.routing(PREFS[1:]):
        want = ref.model(ids).logits
    with torch.no_grad(), hoe.routing(PREFS[1:]):
        got = hoe.model(ids).logits
    assert torch.isfinite(got).all()
    rel = (got - want).norm() / want.norm()
    assert rel < 0.15, f"{precision} HoE deviates from fp32 by {rel:.3f}"
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.98


def test_fused_inference_path_equals_trainable_path_and_follows_gate_updates():
    from hoe_core.routing.context import use_routing

    torch.manual_seed(1)
    base = torch.nn.Linear(16, 12)
    factors = [(torch.randn(12, r), torch.randn(r, 16)) for r in (2, 3, 4)]
    routers = [([0, 1], torch.randn(2, 16), torch.randn(2)), ([1, 2], torch.randn(2, 16), torch.randn(2))]
    layer = HoELinear(base, "x", factors, routers=routers)
    layer.gates.requires_grad_(True)  # being trained
    weights = torch.tensor([[0.2, 0.0, 0.1, 0.3, 0.4], [0.0, 0.5, 0.0, 0.5, 0.0]])
    for seq in (1, 6):
        x = torch.randn(2, seq, 16)
        for _step in range(2):
            with use_routing(weights):
                trainable = layer(x)  # grad enabled and gates require grad: reference path
                with torch.no_grad():
                    fused = layer(x)
            assert trainable.requires_grad and not fused.requires_grad
            assert_close(fused, trainable.detach(), atol=1e-5, rtol=1e-5)
            with torch.no_grad():  # an optimiser step changes gates in place
                layer.gates[1].weight.add_(0.5)


def test_detach_restores_the_bare_backbone(pico_model, pico_dir, three_experts):
    ids = _ids(seed=9)
    with torch.no_grad():
        before = pico_model(ids).logits
    hoe = _hoe(pico_model, three_experts)
    model = hoe.detach()
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert_close(model(ids).logits, before)


@pytest.mark.parametrize(
    "weights",
    [
        [[0.3, 0.0, 0.7, 0.0, 0.0]],  # one row, experts only: folded into A off the compiled path
        [[0.3, 0.0, 0.7, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]],  # rows differ, experts only
        [[0.2, 0.0, 0.1, 0.7, 0.0]],  # one row with a router
        [[0.2, 0.0, 0.1, 0.3, 0.4], [0.0, 0.5, 0.0, 0.5, 0.0]],  # rows differ, two routers
        [[0.0, 0.0, 0.0, 0.0, 0.0]],  # nothing active: the bare linear
    ],
)
@pytest.mark.parametrize(
    "path",
    [
        "fused",  # float32 CPU: numpy gating maps, the compiled decode step and gating
        "unfused",  # float32 CPU without the compiled kernel: numpy maps, torch ops
        "torch",  # float64: the numpy gating maps copied to the kernels' dtype (as on other devices)
    ],
)
def test_inference_kernels_equal_the_reference_path(weights, path, monkeypatch):
    from hoe_core.routing.context import use_routing

    monkeypatch.setenv("HOE_FUSED_CPU", "0" if path == "unfused" else "1")
    dtype = torch.float64 if path == "torch" else torch.float32
    torch.manual_seed(2)
    base = torch.nn.Linear(16, 12, dtype=dtype)
    factors = [(torch.randn(12, r), torch.randn(r, 16)) for r in (2, 3, 4)]
    routers = [([0, 1], torch.randn(2, 16), torch.randn(2)), ([1, 2], torch.randn(2, 16), torch.randn(2))]
    layer = HoELinear(base, "x", factors, routers=routers, dtype=dtype)
    w = torch.tensor(weights)
    for seq in (1, 5):  # decode and prefill shapes, and a 2-D input
        x = torch.randn(w.shape[0], seq, 16, dtype=dtype)
        with trainable_gates([layer]), use_routing(w):
            want = layer(x)  # grad enabled, gates trainable: the reference path
            with torch.no_grad():
                got = layer(x)
                got_2d = layer(x[:, 0])
        assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
        if seq == 1:  # a 2-D input (B, in) is one token per row
            assert_close(got_2d, want.detach()[:, 0], atol=1e-5, rtol=1e-5)
        if not w.any():
            assert_close(got, base(x).detach())
    if w.any():  # the path under test is the one that ran
        assert {k.fused is not None for k in layer.group.kernels.values()} == {path == "fused"}


def test_hooks_on_the_base_linear_still_run_on_the_inference_path():
    """The kernel calls the base's ``forward`` directly only while nothing hooks it; a
    hook (accelerate's offload, a probe) must see every call and shape the output."""
    from hoe_core.routing.context import use_routing

    torch.manual_seed(4)
    base = torch.nn.Linear(8, 6)
    factors = [(torch.randn(6, 2), torch.randn(2, 8))]
    layer = HoELinear(base, "x", factors)
    x = torch.randn(1, 3, 8)
    with use_routing(torch.tensor([[1.0]])), torch.no_grad():
        plain = layer(x).clone()
        calls = []
        handle = base.register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
        hooked = layer(x)
        handle.remove()
        again = layer(x)
    delta = plain - base(x).detach()
    assert len(calls) == 1
    assert_close(hooked, 2 * base(x).detach() + delta)
    assert_close(again, plain)


def test_inference_kernel_follows_a_gate_update_inside_one_routing_block():
    from hoe_core.routing.context import use_routing

    torch.manual_seed(3)
    base = torch.nn.Linear(8, 6)
    factors = [(torch.randn(6, 2), torch.randn(2, 8)) for _ in range(2)]
    layer = HoELinear(base, "x", factors, routers=[([0, 1], None, None)])
    layer.gates.requires_grad_(True)  # being trained
    x = torch.randn(1, 1, 8)
    with use_routing(torch.tensor([[0.0, 0.0, 1.0]])), torch.no_grad():
        before = layer(x)
        layer.gates[0].weight.add_(torch.randn(2, 8))  # in place, as an optimiser step
        after = layer(x)
    with use_routing(torch.tensor([[0.0, 0.0, 1.0]])):
        want = layer(x)
    assert (before - after).abs().max() > 1e-4
    assert_close(after, want.detach(), atol=1e-5, rtol=1e-5)


def test_training_at_another_batch_size_reaches_the_inference_kernels():
    """A kernel built while the gates were frozen, then a trainable forward and optimiser
    step at another batch size: the next inference call at the first size sees the step."""
    from hoe_core.routing.context import use_routing

    torch.manual_seed(4)
    factors = [(torch.randn(12, r), torch.randn(r, 16)) for r in (2, 3)]
    layer = HoELinear(
        torch.nn.Linear(16, 12), "x", factors, routers=[([0, 1], torch.randn(2, 16), torch.randn(2))]
    )
    optimiser = torch.optim.SGD(layer.gates.parameters(), lr=1.0)
    w, x = torch.tensor([[0.2, 0.0, 0.8]]), torch.randn(1, 1, 16)
    with use_routing(w):
        with torch.no_grad():
            before = layer(x)  # batch 1, frozen gates
        layer.gates.requires_grad_(True)
        with use_routing(w.expand(2, -1)):  # training in its own block, at batch 2
            layer(torch.randn(2, 1, 16)).square().sum().backward()
        optimiser.step()
        with torch.no_grad():
            after = layer(x)
    with use_routing(w):
        reference = layer(x).detach()
    assert not torch.allclose(before, after)
    assert_close(after, reference, atol=1e-5, rtol=1e-5)


def test_a_kernel_cached_while_frozen_is_not_reused_for_trainable_gates():
    """Unfreezing is part of the kernel cache key: a block opened after it watches the
    now trainable gates for in-place updates, though its kernel was cached while frozen."""
    from hoe_core.routing.context import use_routing

    torch.manual_seed(5)
    factors = [(torch.randn(6, 2), torch.randn(2, 8)) for _ in range(2)]
    layer = HoELinear(torch.nn.Linear(8, 6), "x", factors, routers=[([0, 1], torch.randn(2, 8), None)])
    w, x = torch.tensor([[0.0, 0.0, 1.0]]), torch.randn(1, 1, 8)
    with use_routing(w), torch.no_grad():
        layer(x)  # cached for this preference while frozen
    layer.gates.requires_grad_(True)
    with use_routing(w), torch.no_grad():
        layer(x)
        layer.gates[0].weight.add_(torch.randn(2, 8))  # in place, no trainable forward
        after = layer(x)
    with use_routing(w):
        reference = layer(x).detach()
    assert_close(after, reference, atol=1e-5, rtol=1e-5)


def test_set_router_prior_inside_a_routing_block_reaches_its_kernels(pico_model, three_experts):
    hoe = _hoe(pico_model, three_experts)
    ids = _ids(seed=11)
    w = hoe.anchor_weights([[1 / 3, 1 / 3, 1 / 3]])
    with hoe.routing(anchor_weights=w), torch.no_grad():
        before = hoe.model(ids).logits
        hoe.set_router_prior(0, [0.8, 0.1, 0.1])
        after = hoe.model(ids).logits
    with hoe.routing(anchor_weights=w), torch.no_grad():
        reference = hoe.model(ids).logits
    assert not torch.allclose(before, after)
    assert_close(after, reference)


def test_sibling_layers_share_one_kernel_group(pico_model, three_experts):
    hoe = _hoe(pico_model, three_experts)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    qkv = [hoe.layers[attn + n] for n in ("q_proj", "k_proj", "v_proj")]
    assert qkv[0].group.members == qkv and [m.slot for m in qkv] == [0, 1, 2]
    assert hoe.layers[mlp + "gate_proj"].group is hoe.layers[mlp + "up_proj"].group
    assert hoe.layers[attn + "o_proj"].group.members == [hoe.layers[attn + "o_proj"]]
    assert hoe.layers[mlp + "down_proj"].group.members == [hoe.layers[mlp + "down_proj"]]


@pytest.mark.parametrize(
    "prefs",
    [
        [[1.0, 0.0, 0.0]],  # a vertex: one expert (folded into A off the compiled path)
        [[0.2, 0.5, 0.3]],  # interior: the router is live
        PREFS,  # rows differ: per-row gates and maps
    ],
)
def test_grouped_model_kernels_equal_the_reference_path(pico_model, three_experts, prefs):
    """The whole model: grouped inference kernels (no grad) against the per-layer
    differentiable path (grad on, gates trainable) -- logits and greedy tokens."""
    hoe = _hoe(pico_model, three_experts)
    ids = _ids(batch=len(prefs), seed=11)
    with trainable_gates(hoe.layers.values()), hoe.routing(prefs):
        want = hoe.model(ids).logits  # reference path
        assert want.requires_grad
        with torch.no_grad():
            got = hoe.model(ids).logits
    assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    steps = 6
    with torch.no_grad(), hoe.routing(prefs):
        fast = hoe.model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=256)
    seq = ids
    with trainable_gates(hoe.layers.values()), hoe.routing(prefs):  # greedy, no cache, reference path
        for _ in range(steps):
            seq = torch.cat([seq, hoe.model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fast, seq)


def test_a_preference_change_reuses_the_stacked_weights(pico_model, three_experts):
    hoe = _hoe(pico_model, three_experts)
    ids = _ids(seed=12)
    layer = hoe.layers["model.layers.0.self_attn.q_proj"]
    outs = []
    for pref in ([0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]):
        with torch.no_grad(), hoe.routing([pref]):
            outs.append(hoe.model(ids).logits)
    assert len(layer.group.stacks) == 1  # same active set: stacked once
    assert len(layer.group.kernels) == 2  # one kernel per preference, reused on the way back
    assert_close(outs[0], outs[2])
    assert (outs[0] - outs[1]).abs().max() > 1e-6


def test_a_preference_in_use_keeps_its_kernels_while_others_come_and_go(pico_model, three_experts):
    """The per-group kernel cache drops the least recently used preference, not the first
    one built: a user who keeps returning to one preference never rebuilds its kernels."""
    from hoe_core.routing.kernel import _CACHE_SIZE

    hoe = _hoe(pico_model, three_experts)
    ids = _ids(seed=13)
    group = hoe.layers["model.layers.0.self_attn.q_proj"].group
    home = [0.2, 0.5, 0.3]

    def kernel_at(pref):
        with torch.no_grad(), hoe.routing([pref]):
            hoe.model(ids)
        return next(reversed(group.kernels.values()))  # the one this call used

    first = kernel_at(home)
    for i in range(2 * _CACHE_SIZE):  # more other preferences than the cache holds
        kernel_at([0.3, 0.3 + 0.01 * i, 0.4 - 0.01 * i])
        assert kernel_at(home) is first
    assert len(group.kernels) == _CACHE_SIZE


def test_an_optimiser_step_inside_one_routing_block_reaches_the_inference_kernels():
    from hoe_core.routing.context import use_routing

    torch.manual_seed(3)
    factors = [(torch.randn(12, r), torch.randn(r, 16)) for r in (2, 3)]
    layer = HoELinear(
        torch.nn.Linear(16, 12), "x", factors, routers=[([0, 1], torch.randn(2, 16), torch.randn(2))]
    )
    assert not any(p.requires_grad for p in layer.gates.parameters())  # frozen until trained
    optimiser = torch.optim.SGD(layer.gates.parameters(), lr=1.0)
    x = torch.randn(1, 1, 16)
    with use_routing(torch.tensor([[0.2, 0.0, 0.8]])):
        with torch.no_grad():
            before = layer(x)  # builds this block's kernel while the gates are frozen
        layer.gates.requires_grad_(True)  # training starts inside the block
        layer(x).square().sum().backward()  # the trainable path
        optimiser.step()
        with torch.no_grad():
            after = layer(x)
        reference = layer(x).detach()
    assert not torch.allclose(before, after)  # the step moved the gates, and the kernel followed
    assert_close(after, reference, atol=1e-5, rtol=1e-5)


def test_gate_edits_between_blocks_drop_the_caches_and_preference_changes_keep_them():
    """Every routing block checks all of a group's gates (identity, in-place version,
    requires_grad) and the factors' dtype once: a frozen gate edited in place or replaced,
    with no ``gates_changed()``, or a cast, is used from the next block on; a preference that
    uses other routers is no gate change, so both active sets stay cached."""
    from hoe_core.routing.context import use_routing

    torch.manual_seed(7)
    factors = [(torch.randn(6, 2), torch.randn(2, 8)) for _ in range(3)]
    routers = [([0, 1], torch.randn(2, 8), torch.randn(2)), ([1, 2], torch.randn(2, 8), torch.randn(2))]
    layer = HoELinear(torch.nn.Linear(8, 6), "x", factors, routers=routers)
    first, second = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    x = torch.randn(1, 3, 8)

    def run(w, x=x):
        with use_routing(w), torch.no_grad():
            got = layer(x)
            want = _mixture(layer, x, w)
        assert_close(got, want, atol=1e-5, rtol=1e-5)
        return got

    run(first)
    stacked = next(iter(layer.group.stacks.values()))
    run(second)
    run(first)
    assert len(layer.group.stacks) == 2 and next(iter(layer.group.stacks.values())) is stacked
    before = run(second)
    with torch.no_grad():
        layer.gates[1].weight.mul_(-1.0)  # frozen, in place, nobody told
    after = run(second)
    assert (after - before).abs().max() > 1e-4
    cached = run(first)
    stacked = layer.group.stacks[next(reversed(layer.group.stacks))]  # the one just used
    new = torch.nn.Parameter(torch.tensor([3.0, -3.0]), requires_grad=False)
    with torch.no_grad():
        while new._version < layer.gates[0].bias._version:  # same version count: only its id differs
            new.add_(0.0)
    layer.gates[0].bias = new  # replaced
    assert (run(first) - cached).abs().max() > 1e-4
    assert all(s is not stacked for s in layer.group.stacks.values())  # rebuilt
    layer.double()  # a cast: the gates keep their ids and version counts, the factors' dtype moves
    run(first, x.double())
    assert {s.weight.dtype for s in layer.group.stacks.values()} == {torch.float64}


def test_a_kernel_built_for_old_gates_is_not_cached_after_another_request_saw_new_ones(monkeypatch):
    """Request threads share a group: one still building its kernel from the old gates when
    another has seen them change (and cleared the caches) must not leave its kernel cached."""
    from hoe_core.routing.context import use_routing
    from hoe_core.routing.kernel import SiblingGroup

    torch.manual_seed(8)
    factors = [(torch.randn(6, 2), torch.randn(2, 8)) for _ in range(2)]
    layer = HoELinear(
        torch.nn.Linear(8, 6), "x", factors, routers=[([0, 1], torch.randn(2, 8), torch.randn(2))]
    )
    w, x = torch.tensor([[0.2, 0.0, 0.8]]), torch.randn(1, 2, 8)
    real, interleaved = SiblingGroup._build, []

    def slow_build(self, plan, stacked):
        kernel = real(self, plan, stacked)
        if not interleaved:  # meanwhile the gates change and another request runs
            interleaved.append(True)
            with torch.no_grad():
                layer.gates[0].weight.mul_(-1.0)
            with use_routing(w), torch.no_grad():
                layer(x)
        return kernel

    monkeypatch.setattr(SiblingGroup, "_build", slow_build)
    with use_routing(w), torch.no_grad():
        layer(x)  # the slow request: the old gates
    with use_routing(w), torch.no_grad():
        got = layer(x)  # a later request
        want = _mixture(layer, x, w)
    assert interleaved
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_layer_built_under_inference_mode_serves_every_preference():
    """Gates made under ``torch.inference_mode`` keep no version count; the per-request gate
    check does without it instead of raising."""
    from hoe_core.routing.context import use_routing

    torch.manual_seed(9)
    with torch.inference_mode():
        factors = [(torch.randn(6, 2), torch.randn(2, 8)) for _ in range(2)]
        layer = HoELinear(torch.nn.Linear(8, 6), "x", factors, routers=[([0, 1], torch.randn(2, 8), None)])
    x = torch.randn(1, 3, 8)
    for weights in ([[1.0, 0.0, 0.0]], [[0.2, 0.0, 0.8]]):  # an expert alone, then the router
        w = torch.tensor(weights)
        with use_routing(w), torch.inference_mode():
            got = layer(x)
            want = _mixture(layer, x, w)
        assert_close(got, want, atol=1e-5, rtol=1e-5)
