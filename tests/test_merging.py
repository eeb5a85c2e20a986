"""Merge methods: defining properties, and PCB against a direct transcription of the paper's steps."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from hoe_core.experts.merging import MERGE_METHODS, merge_task_vectors, pcb


def _vectors(n=3, d=200, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_task_arithmetic_is_weighted_sum():
    t, w = _vectors(), torch.tensor([0.2, 0.5, 0.3])
    assert_close(MERGE_METHODS["ta"](t, w, scale=2.0), 2.0 * (w[:, None] * t).sum(0))


def test_ties_with_one_hot_weight_and_full_density_is_that_vector():
    t = _vectors()
    assert_close(MERGE_METHODS["ties"](t, torch.tensor([0.0, 1.0, 0.0]), density=1.0), t[1])


def test_dare_is_seeded_and_full_density_equals_ta():
    t, w = _vectors(), torch.tensor([0.2, 0.5, 0.3])
    assert_close(MERGE_METHODS["dare"](t, w, density=1.0), (w[:, None] * t).sum(0))
    a = MERGE_METHODS["dare"](t, w, density=0.3, seed=7)
    b = MERGE_METHODS["dare"](t, w, density=0.3, seed=7)
    assert_close(a, b)


def _pcb_reference(T: np.ndarray, lam: np.ndarray, ratio=0.1, q=1e-4) -> np.ndarray:
    """Row-by-row loops over the SPEC's six steps (independent of the vectorised code)."""
    n, d = T.shape
    C = np.empty_like(T)
    for i in range(n):
        a = np.abs(T[i])
        srt = np.sort(a)
        C[i] = np.sign(T[i]) * np.clip(a, srt[int(math.floor(d * q))], srt[int(math.floor(d * (1 - q) - 1))])
    intra = np.empty_like(T)
    for i in range(n):
        m = np.abs(C[i])
        intra[i] = np.exp(n * ((m - m.min()) / (m.max() - m.min())) ** 2)
    inter = np.tanh(T * T.sum(0, keepdims=True))
    beta = intra * inter
    s = np.empty_like(T)
    for i in range(n):
        t = np.sort(beta[i])[int(math.floor(d * (1 - ratio)))]
        s[i] = (np.maximum(beta[i], t) - t) / (beta[i].max() - t)
    return (lam[:, None] * s * C).sum(0) / np.maximum(s.sum(0), 1e-12)


def test_pcb_matches_transcription_of_the_steps():
    T = _vectors(n=3, d=1000, seed=3).double()
    lam = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ours = pcb(T, lam).double()
    ref = torch.from_numpy(_pcb_reference(T.numpy(), lam.numpy()))
    assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    kept = (ours != 0).float().mean()
    assert 0.1 <= kept <= 0.3  # about keep_ratio per row, union over 3 rows


@pytest.mark.parametrize("rows", ["zero", "constant", "tiny"])
def test_pcb_is_finite_where_the_authors_code_gives_nan(rows):
    if rows == "zero":
        T = torch.zeros(2, 50)
    elif rows == "constant":
        T = torch.stack([torch.full((50,), 0.3), torch.randn(50)])
    else:
        T = torch.randn(2, 3)
    out = pcb(T, torch.tensor([0.5, 0.5]))
    assert torch.isfinite(out).all()
    if rows == "zero":
        assert (out == 0).all()


def test_merge_task_vectors_per_module_keeps_shapes_and_checks_inputs():
    g = torch.Generator().manual_seed(0)
    tvs = [
        {"m.q_proj": torch.randn(4, 3, generator=g), "m.v_proj": torch.randn(2, 3, generator=g)}
        for _ in range(2)
    ]
    merged = merge_task_vectors(tvs, [0.25, 0.75], "ta")
    assert_close(merged["m.v_proj"], 0.25 * tvs[0]["m.v_proj"] + 0.75 * tvs[1]["m.v_proj"])
    with pytest.raises(ValueError, match="one weight per task vector"):
        merge_task_vectors(tvs, [1.0], "ta")
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_task_vectors(tvs, [0.5, 0.5], "nope")


def test_ties_elects_sign_by_weighted_mass_and_averages_agreeing_rows():
    t = torch.tensor([[1.0, -2.0], [-3.0, -4.0]])
    out = MERGE_METHODS["ties"](t, torch.tensor([0.75, 0.25]), density=1.0)
    # entry 0: weighted mass 0.75 - 0.75 = 0 -> sign +, only row 0 agrees -> 1.0
    # entry 1: both negative -> (0.75 * -2 + 0.25 * -4) / 1.0
    assert_close(out, torch.tensor([1.0, -2.5]))


def test_task_arithmetic_of_lora_deltas_stays_factorised_and_exact():
    from hoe_core.experts.task_svd import LowRankDelta

    gen = torch.Generator().manual_seed(0)
    loras = [
        {"m": LowRankDelta(torch.randn(6, r, generator=gen), torch.randn(r, 5, generator=gen), scale=s)}
        for r, s in [(2, 0.5), (3, 2.0)]
    ]
    merged = merge_task_vectors(loras, [0.3, 0.7], "ta", scale=1.5)["m"]
    assert isinstance(merged, LowRankDelta) and merged.B.shape == (6, 5) and merged.A.shape == (5, 5)
    dense = merge_task_vectors([{"m": lo["m"].dense()} for lo in loras], [0.3, 0.7], "ta", scale=1.5)["m"]
    torch.testing.assert_close(merged.dense(), dense, atol=1e-5, rtol=1e-5)
