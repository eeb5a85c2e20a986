"""The compiled CPU kernels (numba) against the math and against the torch path."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from hoe_core.routing import fused_cpu
from hoe_core.routing import kernel as kernel_mod
from hoe_core.routing.context import use_routing
from hoe_core.routing.kernel import group_siblings
from hoe_core.routing.layer import HoELinear
from tests.conftest import trainable_gates


@pytest.fixture(autouse=True)
def _fused_on(monkeypatch):
    monkeypatch.delenv("HOE_FUSED_CPU", raising=False)  # on by default; numba is a requirement
    assert fused_cpu.numba is not None


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize(("batch", "seq", "sizes"), [(1, 1, [3, 3, 3]), (2, 2, [2, 4]), (3, 1, [5])])
def test_hidden_rows_is_the_mixture_formula(batch, seq, sizes):
    rng = np.random.default_rng(0)
    n_rank, n_in, s = 7, 13, sum(sizes)
    x = rng.standard_normal((batch * seq, n_in)).astype(np.float32)
    w = rng.standard_normal((n_rank + s, n_in)).astype(np.float32)
    b = rng.standard_normal(n_rank + s).astype(np.float32)
    g_fixed = rng.random((batch, n_rank)).astype(np.float32)
    maps = rng.random((batch, s, n_rank)).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    h = np.empty((batch * seq, n_rank), np.float32)
    fused_cpu.hidden_rows(x, w, b, n_rank, starts, g_fixed, maps, seq, h)
    out = x.astype(np.float64) @ w.T + b  # (n, R + S)
    for i in range(batch * seq):
        row = i // seq
        z = out[i, n_rank:]
        probs = np.concatenate([_softmax(z[lo:hi]) for lo, hi in zip(starts[:-1], starts[1:])])
        want = out[i, :n_rank] * (g_fixed[row] + probs @ maps[row])
        np.testing.assert_allclose(h[i], want, rtol=1e-4, atol=1e-4)


def _static_hidden(x, w, g, seq, h):
    """hidden_rows without routers: h = (A x) * g[row]."""
    zeros, starts = np.zeros(w.shape[0], np.float32), np.zeros(1, np.int64)
    maps = np.zeros((g.shape[0], 0, w.shape[0]), np.float32)
    fused_cpu.hidden_rows(x, w, zeros, w.shape[0], starts, g, maps, seq, h)


def test_static_hidden_rows_and_add_low_rank_are_matmuls():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 9)).astype(np.float32)
    w = rng.standard_normal((6, 9)).astype(np.float32)
    g = rng.random((2, 6)).astype(np.float32)
    h = np.empty((4, 6), np.float32)
    _static_hidden(x, w, g, 2, h)  # rows 0, 1 -> batch row 0; 2, 3 -> 1
    np.testing.assert_allclose(h, (x @ w.T) * np.repeat(g, 2, 0), rtol=1e-5, atol=1e-5)
    b_t = rng.standard_normal((3, 5)).astype(np.float32)
    y = rng.standard_normal((4, 5)).astype(np.float32)
    want = y + h[:, 2:5] @ b_t
    fused_cpu.add_low_rank(h, 2, 5, b_t, y)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()


def _from_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)


def test_bfloat16_outputs_are_summed_in_float32_and_rounded_to_nearest_even():
    h = np.array([[1.0, 2.0**-8, 2.0**-8 + 2.0**-10, -3.0]], np.float32)
    b_t = np.eye(4, dtype=np.float32)  # y[o] += h[o]
    y = _bf16_bits(torch.tensor([[1.0, 1.0, 1.0, 0.5]]))
    fused_cpu.add_low_rank(h, 0, 4, _bf16_bits(torch.from_numpy(b_t)), y)
    got = _from_bits(y)
    want = (torch.tensor([[1.0, 1.0, 1.0, 0.5]]) + torch.from_numpy(h)).to(torch.bfloat16)  # torch rounds RNE
    assert torch.equal(got, want)
    assert got[0, 1] == 1.0 and got[0, 2] == 1.0 + 2.0**-7  # a tie to even; just above it rounds up


def test_bfloat16_inputs_and_weights_are_widened_exactly():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((2, 8)).astype(np.float32)).to(torch.bfloat16)
    w = torch.from_numpy(rng.standard_normal((5, 8)).astype(np.float32)).to(torch.bfloat16)
    g = np.ones((1, 5), np.float32)
    got, want = np.empty((2, 5), np.float32), np.empty((2, 5), np.float32)
    _static_hidden(_bf16_bits(x), _bf16_bits(w), g, 2, got)
    _static_hidden(x.float().numpy(), w.float().numpy(), g, 2, want)  # the same values in float32
    np.testing.assert_array_equal(got, want)


def _layer(seed=2, dtype=torch.float32):
    torch.manual_seed(seed)
    base = torch.nn.Linear(16, 12).to(dtype)
    factors = [(torch.randn(12, r), torch.randn(r, 16)) for r in (2, 3, 4)]
    routers = [([0, 1], torch.randn(2, 16), torch.randn(2)), ([0, 1, 2], torch.randn(3, 16), torch.randn(3))]
    return HoELinear(base, "x", factors, routers=routers, dtype=dtype)


def _spy(monkeypatch):
    calls = []
    for name in ("group_step", "gate_rows"):
        real = getattr(fused_cpu, name)
        monkeypatch.setattr(fused_cpu, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_calls_after_warm_up_compile_nothing_new(dtype):
    """``warm_up`` compiles what a served model calls, batch 1 or more: a batch's gating
    maps reach the compiled calls packed like one row's, so numba reuses the warmed-up
    versions instead of compiling another layout on the first batched request."""
    fused_cpu.warm_up(dtype)
    kernels = (fused_cpu.group_step, fused_cpu.gate_rows)
    before = [len(k.signatures) for k in kernels]
    w = torch.tensor([[0.2, 0.0, 0.1, 0.3, 0.4], [0.0, 0.5, 0.0, 0.0, 0.5]])
    with use_routing(w), torch.no_grad():
        layer = _layer(dtype=dtype)
        layer(torch.randn(2, 1, 16).to(dtype))  # decode step: group_step
        (kernel,) = layer.group.kernels.values()
        layer(torch.randn(2, 7, 16).to(dtype))  # prefill: the torch GEMM, then gate_rows
    assert kernel.fused is not None
    assert [len(k.signatures) for k in kernels] == before


@pytest.mark.parametrize(
    "weights",
    [
        [[0.2, 0.0, 0.1, 0.3, 0.4]],  # routers of two block sizes
        [[0.2, 0.0, 0.1, 0.3, 0.4], [0.0, 0.5, 0.0, 0.0, 0.5]],  # rows differ
        [[0.3, 0.0, 0.7, 0.0, 0.0]],  # experts only, one row
        [[0.3, 0.0, 0.7, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]],  # experts only, rows differ
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_take_the_fused_path_and_equal_the_torch_path(monkeypatch, weights, dtype):
    w = torch.tensor(weights)
    x = torch.randn(w.shape[0], 1, 16).to(dtype)
    with use_routing(w), torch.no_grad():
        calls = _spy(monkeypatch)
        got = _layer(dtype=dtype)(x)
    assert calls == ["group_step"]
    monkeypatch.setenv("HOE_FUSED_CPU", "0")
    with use_routing(w), torch.no_grad():
        calls.clear()
        want = _layer(dtype=dtype)(x)
    assert not calls
    assert got.dtype == want.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bfloat16: torch rounds every step, we once
    assert_close(got, want, atol=tol, rtol=tol)


def test_prefill_keeps_torch_gemms_and_other_dtypes_stay_on_torch(monkeypatch):
    calls = _spy(monkeypatch)
    layer = _layer()
    w = torch.tensor([[0.2, 0.0, 0.1, 0.3, 0.4]])
    with use_routing(w), torch.no_grad():
        layer(torch.randn(1, fused_cpu.MAX_ROWS + 1, 16))  # a prompt: torch's GEMMs
        assert calls == ["gate_rows"]  # only the routers' gating is compiled
        calls.clear()
        wide = layer.base.register_forward_hook(lambda m, i, o: o.double())  # the base returns float64
        x = torch.randn(1, 1, 16)
        got = layer(x)
        wide.remove()
    assert got.dtype == torch.float64
    assert calls == ["group_step", "gate_rows"]  # then torch adds the delta in the base's dtype
    with trainable_gates([layer]), use_routing(w):
        want = layer(x)  # the differentiable reference
    assert_close(got, want.detach().double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("weights", "gated"),
    [
        ([[0.2, 0.0, 0.1, 0.3, 0.4]], True),  # routers of two block sizes
        ([[0.2, 0.0, 0.1, 0.3, 0.4], [0.0, 0.5, 0.0, 0.0, 0.5]], True),  # rows differ
        ([[0.3, 0.0, 0.7, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]], False),  # no router: nothing to gate
    ],
)
@pytest.mark.parametrize(
    ("dtype", "native"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_prefill_gating_is_one_compiled_call_and_equals_the_torch_path(
    monkeypatch, weights, gated, dtype, native
):
    """Both gate in float32 (bfloat16 GEMMs too, with bfloat16 units: ``native``)."""
    monkeypatch.setattr(kernel_mod, "native_bfloat16", lambda: native)
    w = torch.tensor(weights)
    x = torch.randn(w.shape[0], 7, 16).to(dtype)  # a prompt of 7 tokens per row
    calls = _spy(monkeypatch)
    with use_routing(w), torch.no_grad():
        got = [layer(x) for layer in _siblings(dtype)]
    assert calls == (["gate_rows"] if gated else [])  # one per group (bfloat16: computed in float32)
    monkeypatch.setenv("HOE_FUSED_CPU", "0")
    with use_routing(w), torch.no_grad():
        want = [layer(x) for layer in _siblings(dtype)]
    layers = _siblings(dtype)
    with trainable_gates(layers), use_routing(w):
        reference = [layer(x).detach() for layer in layers]  # differentiable path
    for a, b, c in zip(got, want, reference):
        assert a.dtype == dtype
        assert_close(a, b, atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 2**-7)  # bf16: one ulp
        # bfloat16: the reference rounds every step; a few ulps of the output's scale apart
        tol = 1e-5 if dtype == torch.float32 else 2**-6 * c.abs().max().item()
        assert_close(a, c, atol=tol, rtol=1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_on_the_cpu_computes_the_torch_kernels_in_float32_or_natively(monkeypatch, native):
    """Without bfloat16 units: exact float32 copies, made once per active set, and outputs at
    least as close to the float32 result as the bfloat16 reference path; with them: the
    factors as stored in bfloat16 GEMMs, gated in float32, within a few bfloat16 ulps of the
    float32 result. Outputs stay bfloat16 either way."""
    monkeypatch.setattr(kernel_mod, "native_bfloat16", lambda: native)
    torch.manual_seed(0)
    w = torch.tensor([[0.2, 0.0, 0.1, 0.3, 0.4]])
    x = torch.randn(1, 7, 16).to(torch.bfloat16)
    layers = _siblings(torch.bfloat16)
    calls = _spy(monkeypatch)
    with use_routing(w) as routing, torch.no_grad():
        got = [layer(x) for layer in layers]
    assert calls == ["gate_rows"]  # the routers' gating compiled in both cases
    kernel = next(iter(routing.kernels.values()))
    (stacked,) = layers[0].group.stacks.values()
    compute = torch.bfloat16 if native else torch.float32
    assert kernel.weight.dtype == compute and all(t.dtype == compute for t in kernel.b_ts)
    if native:
        assert stacked.widened is None and kernel.b_ts[0] is stacked.b_ts[0]  # no copies
    else:
        assert torch.equal(stacked.widened[0], stacked.weight.float())  # widening is exact
    with use_routing(torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.4]])) as other, torch.no_grad():
        layers[0](x)  # another preference, the same active set: the same factors
    assert next(iter(other.kernels.values())).b_ts[0] is kernel.b_ts[0]
    with trainable_gates(layers), use_routing(w):
        want = [layer(x).detach() for layer in layers]  # differentiable path, in bfloat16 throughout
    wide = [layer.float() for layer in _siblings(torch.bfloat16)]
    with use_routing(w), torch.no_grad():
        exact = [layer(x.float()) for layer in wide]  # the same weights in float32 throughout
    for a, b, c in zip(got, want, exact):
        assert a.dtype == torch.bfloat16
        assert_close(a, b, atol=3e-2, rtol=3e-2)
        if native:  # GEMMs round like the reference's: not always closer, but near
            assert (a.float() - c).abs().max() <= 2**-6 * c.abs().max()
        else:
            assert (a.float() - c).abs().max() <= (b.float() - c).abs().max() + 1e-6  # closer to exact


def test_prefill_gating_writes_only_what_it_can_address():
    """gate() refuses (and leaves untouched) any z that is not this kernel's contiguous
    float32 (B, T, R + S); what it accepts it gates like the torch ops."""
    layer = _layer()
    w = torch.tensor([[0.2, 0.0, 0.1, 0.3, 0.4]])
    with use_routing(w) as routing, torch.no_grad():
        layer(torch.randn(1, 1, 16))
    kernel = next(iter(routing.kernels.values()))
    width = kernel.weight.shape[0]
    refused = [
        torch.randn(2, 5, width),  # two batch rows: not this kernel's batch
        torch.randn(1, 5, width + 1),  # another width
        torch.randn(1, 5, width + 1)[..., :-1],  # rows not adjacent
        torch.randn(1, 5, width, dtype=torch.float64),
        torch.randn(1, 5, width).to(torch.bfloat16),
        torch.randn(1, 5, width, requires_grad=True),
    ]
    for z in refused:
        before = z.detach().clone()
        assert not kernel.fused.gate(z)
        assert torch.equal(z.detach(), before)
    z = torch.randn(1, 5, width)
    h, logits = z[..., : kernel.n_rank], z[..., kernel.n_rank :]
    probs = torch.cat([torch.softmax(part, -1) for part in logits.split(kernel.sizes, -1)], -1)
    want = h * torch.baddbmm(kernel.g_fixed, probs, kernel.maps)  # the torch path's gating
    assert kernel.fused.gate(z)
    assert_close(z[..., : kernel.n_rank], want, atol=1e-6, rtol=1e-5)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("HOE_FUSED_CPU", "0")
    assert not fused_cpu.available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_warm_up_compiles_the_decode_signatures(dtype):
    fused_cpu.warm_up(dtype)
    bits = "uint16" if dtype == torch.bfloat16 else "float32"
    assert any(bits in str(sig) for sig in fused_cpu.group_step.signatures)


def _siblings(dtype=torch.float32, seed=4):
    """q/k/v-like layers on one input, grouped; factors and gates are float16 values (as in
    shipped bundles), so float32 kernels store them as float16."""
    torch.manual_seed(seed)
    half = lambda *shape: torch.randn(*shape).half().float()  # noqa: E731
    layers = {}
    for name, out in (("attn.q_proj", 12), ("attn.k_proj", 6), ("attn.v_proj", 6)):
        factors = [(half(out, r), half(r, 16)) for r in (2, 3, 4)]
        routers = [([0, 1], half(2, 16), half(2)), ([0, 1, 2], half(3, 16), half(3))]
        layers[name] = HoELinear(
            torch.nn.Linear(16, out).to(dtype), name, factors, routers=routers, dtype=dtype
        )
    group_siblings(layers)
    return list(layers.values())


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (0, 1, 1, 2), (2, 2, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_group_is_one_call_in_any_member_order_and_equals_the_torch_path(monkeypatch, order, dtype):
    w = torch.tensor([[0.2, 0.0, 0.1, 0.3, 0.4]])
    x = torch.randn(1, 1, 16).to(dtype)
    calls = _spy(monkeypatch)
    with use_routing(w) as routing, torch.no_grad():
        layers = _siblings(dtype)
        got = [layers[i](x) for i in order]
    kernel = next(iter(routing.kernels.values()))
    if dtype == torch.float32:
        assert kernel.fused.factors.weight.dtype == np.int16  # float16 storage: exact here
    assert calls.count("group_step") == 1 + (order[0] != 0) + sum(
        order[i] == order[i - 1] for i in range(1, len(order))
    )
    monkeypatch.setenv("HOE_FUSED_CPU", "0")
    with use_routing(w), torch.no_grad():
        layers = _siblings(dtype)
        want = [layers[i](x) for i in order]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert_close(a, b, atol=tol, rtol=tol)
    assert len({t.data_ptr() for t in got}) == len(got)  # every call its own output tensor


def test_a_sibling_sees_its_input_changed_in_place():
    w = torch.tensor([[0.2, 0.0, 0.1, 0.3, 0.4]])
    x = torch.randn(1, 1, 16)
    with use_routing(w), torch.no_grad():
        q, k, _ = _siblings()
        q(x)
        x.mul_(2)  # k's output computed with q's must not be handed out for the new x
        got = k(x)
        fresh = _siblings()[1]
        want = fresh(x)
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_output_of_the_wrong_size_is_never_written_by_address():
    w = torch.tensor([[0.2, 0.0, 0.1, 0.3, 0.4]])
    with use_routing(w), torch.no_grad():
        q, k, v = _siblings()
        k.base.register_forward_hook(lambda m, i, o: o[..., :-1].contiguous())  # one feature short
        with pytest.raises(RuntimeError):  # torch refuses to add k's delta; no write past its end
            q(torch.randn(1, 1, 16))
        x = torch.randn(1, 1, 17)  # the wrong input width: the base refuses it first
        with pytest.raises(RuntimeError):
            q(x)


def test_inference_mode_tensors_have_no_version_and_still_get_the_group_step(monkeypatch):
    w = torch.tensor([[0.2, 0.0, 0.1, 0.3, 0.4]])
    layers = _siblings()
    calls = _spy(monkeypatch)
    with torch.inference_mode():
        x = torch.randn(1, 1, 16)
        with use_routing(w):
            got = [layer(x) for layer in layers]
    assert calls == ["group_step"] * 3  # no version to key a shared result on: each member alone
    monkeypatch.setenv("HOE_FUSED_CPU", "0")
    with use_routing(w), torch.no_grad():
        want = [layer(x.clone()) for layer in _siblings()]
    for a, b in zip(got, want):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_member_without_active_experts_costs_no_torch_mixture(monkeypatch):
    from hoe_core.routing.kernel import Kernel

    torch.manual_seed(5)
    half = lambda *shape: torch.randn(*shape).half().float()  # noqa: E731
    layers = {
        "attn.q_proj": HoELinear(torch.nn.Linear(16, 12), "q", [(half(12, 2), half(2, 16))] * 3),
        "attn.k_proj": HoELinear(torch.nn.Linear(16, 6), "k", [(half(6, 2), half(2, 16)), None, None]),
    }
    group_siblings(layers)
    q, k = layers.values()
    torch_calls = []
    real = Kernel._hidden_torch
    monkeypatch.setattr(Kernel, "_hidden_torch", lambda *a: torch_calls.append(1) or real(*a))
    x = torch.randn(1, 1, 16)
    with use_routing(torch.tensor([[0.0, 0.5, 0.5]])), torch.no_grad():  # expert 0 off: k has none
        got_q, got_k = q(x), k(x)
    assert not torch_calls
    assert_close(got_k, k.base(x))
    monkeypatch.setenv("HOE_FUSED_CPU", "0")
    with use_routing(torch.tensor([[0.0, 0.5, 0.5]])), torch.no_grad():
        assert_close(got_q, q(x), atol=1e-5, rtol=1e-5)
