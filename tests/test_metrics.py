"""Front metrics against hand-computed values."""

import numpy as np
import pytest

from hoe_core.evaluation.metrics import hypervolume, mean_ci, pareto_mask, simplex_grid, steerability


def test_hypervolume_of_two_rectangles_and_points_below_reference():
    pts = np.array([[2.0, 1.0], [1.0, 2.0], [0.5, 0.5], [-1.0, 5.0]])
    # union of [0,2]x[0,1] and [0,1]x[0,2] = 2 + 2 - 1; (-1, 5) lies left of the reference
    assert hypervolume(pts, np.array([0.0, 0.0])) == pytest.approx(3.0)
    assert hypervolume(pts[2:3], np.array([1.0, 1.0])) == 0.0


def test_pareto_mask_keeps_non_dominated_points():
    pts = np.array([[2.0, 1.0], [1.0, 2.0], [0.5, 0.5], [2.0, 2.0]])
    assert pareto_mask(pts).tolist() == [False, False, False, True]


def test_steerability_is_rank_correlation_per_objective():
    lam = simplex_grid(2, 5)
    rewards = np.stack([lam[:, 0] ** 2, -lam[:, 1]], 1)  # first follows lambda, second opposes
    np.testing.assert_allclose(steerability(lam, rewards), [1.0, -1.0])


def test_simplex_grid_sizes_and_sums():
    assert simplex_grid(2, 11).shape == (11, 2)
    g = simplex_grid(3, 5)
    assert g.shape == (15, 3) and np.allclose(g.sum(1), 1) and (g >= 0).all()


def test_mean_ci_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = mean_ci(rng.normal(size=10)), mean_ci(rng.normal(size=1000))
    assert small.low < small.mean < small.high
    assert (large.high - large.low) < (small.high - small.low)
    with pytest.raises(ValueError):
        mean_ci(np.array([]))
