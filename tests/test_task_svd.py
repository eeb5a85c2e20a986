"""Task-SVD against the math: exact at full rank, Eckart-Young error at rank r."""

import torch
from torch.testing import assert_close

from hoe_core.config import TaskSVDConfig
from hoe_core.experts.task_svd import (
    LowRankDelta,
    choose_rank,
    objective_vector_from_weights,
    svd,
    task_svd,
    truncate,
)


def _tau(out=24, inp=16, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_full_rank_reproduces_tau():
    tau = _tau()
    factors, rep = truncate(tau, rank=16)
    assert rep.rank == 16 and abs(rep.energy_retained - 1) < 1e-6
    assert_close(factors.B @ factors.A, tau, atol=1e-5, rtol=1e-5)


def test_rank_r_error_is_sqrt_of_dropped_sigma_squared():
    tau = _tau(seed=1)
    sigma = torch.linalg.svdvals(tau.double())
    for r in (1, 3, 7, 12):
        factors, rep = truncate(tau, rank=r)
        err = torch.linalg.norm(tau.double() - (factors.B @ factors.A).double())
        expected = sigma[r:].pow(2).sum().sqrt()
        assert abs(float(err) - float(expected)) < 1e-4 * max(1.0, float(expected))
        assert abs(rep.frobenius_error - float(expected)) < 1e-4 * max(1.0, float(expected))
        assert abs(rep.energy_retained - float(sigma[:r].pow(2).sum() / sigma.pow(2).sum())) < 1e-6


def test_lowrank_svd_via_qr_matches_dense_svd():
    g = torch.Generator().manual_seed(2)
    delta = LowRankDelta(B=torch.randn(40, 6, generator=g), A=torch.randn(6, 30, generator=g), scale=0.5)
    _, s_fast, _ = svd(delta)
    s_dense = torch.linalg.svdvals(delta.dense())[:6]
    assert_close(s_fast, s_dense, atol=1e-4, rtol=1e-4)
    factors, _ = truncate(delta, rank=6)
    assert_close(factors.B @ factors.A, delta.dense(), atol=1e-4, rtol=1e-4)


def test_energy_threshold_picks_smallest_sufficient_rank():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5])
    total = float((sigma**2).sum())
    assert choose_rank(sigma, cap=4, energy=9 / total) == 1
    assert choose_rank(sigma, cap=4, energy=9.5 / total) == 2
    assert choose_rank(sigma, cap=2, energy=0.999) == 2  # capped
    assert choose_rank(sigma, cap=4, energy=None) == 4


def test_rescale_restores_frobenius_norm():
    tau = _tau(seed=3)
    factors, _ = truncate(tau, rank=3, rescale=True)
    assert abs(float(torch.linalg.norm(factors.B @ factors.A)) - float(torch.linalg.norm(tau))) < 1e-3


def test_pruning_then_svd_and_per_type_ranks():
    tau = {"model.layers.0.self_attn.q_proj": _tau(seed=4), "model.layers.0.mlp.down_proj": _tau(seed=5)}
    cfg = TaskSVDConfig(rank=8, ranks={"q_proj": 2}, density=0.5)
    factors, reports = task_svd(tau, cfg)
    assert factors["model.layers.0.self_attn.q_proj"].A.shape[0] == 2
    assert factors["model.layers.0.mlp.down_proj"].A.shape[0] == 8
    assert [r.module for r in reports] == list(tau)


def test_zero_delta_is_finite():
    factors, rep = truncate(torch.zeros(8, 5), rank=3)
    assert torch.isfinite(factors.B).all() and torch.isfinite(factors.A).all()
    assert rep.energy_retained == 1.0 and rep.frobenius_error == 0.0


def test_objective_vector_from_full_weights():
    base = {"model.layers.0.self_attn.q_proj.weight": torch.ones(3, 3), "model.norm.weight": torch.ones(3)}
    tuned = {
        "model.layers.0.self_attn.q_proj.weight": torch.full((3, 3), 1.5),
        "model.norm.weight": torch.ones(3),
    }
    tau = objective_vector_from_weights(base, tuned, ("q_proj",))
    assert list(tau) == ["model.layers.0.self_attn.q_proj"]
    assert_close(tau["model.layers.0.self_attn.q_proj"], torch.full((3, 3), 0.5))
