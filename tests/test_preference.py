"""Preference routing properties (hypothesis): simplex weights, exact reconstruction
inside the hull, vertices, permutation equivariance; and input validation."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hoe_core.routing.preference import normalize_preference, route


def simplex_points(n: int, min_size=1, max_size=1):
    point = st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n).filter(lambda v: sum(v) > 1e-3)
    return st.lists(point, min_size=min_size, max_size=max_size).map(
        lambda rows: np.array([np.array(r) / sum(r) for r in rows])
    )


@st.composite
def setups(draw):
    n = draw(st.integers(2, 4))
    k = draw(st.integers(n, n + 4))
    anchors = draw(simplex_points(n, k, k))
    lam = draw(simplex_points(n))[0]
    return n, anchors, lam


def _distinct(anchors: np.ndarray, lam: np.ndarray) -> bool:
    d = np.linalg.norm(anchors[:, None] - anchors[None], axis=-1)[np.triu_indices(len(anchors), 1)]
    dist = np.sort(np.linalg.norm(anchors - lam, axis=1))
    return d.min() > 1e-3 and np.diff(dist).min() > 1e-6  # no ties in which anchors are nearest


@settings(max_examples=200, deadline=None)
@given(setups())
def test_weights_on_simplex_and_only_on_nearest(setup):
    n, anchors, lam = setup
    w = route(lam, anchors)
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-9
    assert (w > 0).sum() <= n


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 3).flatmap(lambda n: simplex_points(n)))
def test_exact_reconstruction_inside_the_hull(lam):
    lam = lam[0]
    n = len(lam)
    anchors = np.vstack([np.eye(n), np.full(n, 1 / n)])  # vertices + centre: hulls tile the simplex
    w = route(lam, anchors)
    np.testing.assert_allclose(w @ anchors, lam, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 5).flatmap(lambda n: simplex_points(n)))
def test_vertices_only_reconstruct_and_return_lambda(lam):
    lam = lam[0]
    w = route(lam, np.eye(len(lam)))
    np.testing.assert_allclose(w, lam, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(setups(), st.data())
def test_anchor_returns_itself_alone(setup, data):
    _, anchors, _ = setup
    k = data.draw(st.integers(0, len(anchors) - 1))
    assume(np.sort(np.linalg.norm(anchors - anchors[k], axis=1))[1] > 1e-9)  # no duplicate
    w = route(anchors[k], anchors)
    assert w[k] == 1.0 and w.sum() == 1.0


@settings(max_examples=150, deadline=None)
@given(setups(), st.randoms())
def test_permutation_equivariance(setup, rnd):
    n, anchors, lam = setup
    assume(_distinct(anchors, lam))
    w = route(lam, anchors)
    obj = list(range(n))
    rnd.shuffle(obj)
    np.testing.assert_allclose(route(lam[obj], anchors[:, obj]), w, atol=1e-7)
    rows = list(range(len(anchors)))
    rnd.shuffle(rows)
    np.testing.assert_allclose(route(lam, anchors[rows]), w[rows], atol=1e-7)


@pytest.mark.parametrize(
    "values, n, match",
    [
        ([0.5, 0.5], 3, "needs 3 values"),
        ([-0.1, 0.5, 0.6], 3, ">= 0"),
        ([float("nan"), 0.5, 0.5], 3, "finite"),
        ([float("inf"), 0.5, 0.5], 3, "finite"),
        ([0, 0, 0], 3, "not all be zero"),
        (["a", 1, 1], 3, "must be numbers"),
    ],
)
def test_normalize_rejects_bad_preferences(values, n, match):
    with pytest.raises(ValueError, match=match):
        normalize_preference(values, n)


def test_normalize_scales_huge_values_onto_the_simplex():
    lam = normalize_preference([1e300, 1.0, 0.0], 3)
    assert abs(lam.sum() - 1) < 1e-12 and lam[0] == pytest.approx(1.0)
