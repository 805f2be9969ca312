"""Model zoo: parameter counts and sizing, init variances, forward passes, DLN teachers' ranks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llc_bench.models import (
    count_params,
    dln_rank,
    dln_teacher,
    end_to_end_matrix,
    flatten,
    full_widths,
    hidden_widths_for_target,
    init_params,
    kernels,
    make_apply,
)
from llc_bench.rng import STREAMS, chain_keys, stream_key


def test_streams_are_distinct_and_reproducible():
    data = [jax.random.key_data(stream_key(0, s)) for s in STREAMS]
    assert len({tuple(np.asarray(k)) for k in data}) == len(STREAMS)
    np.testing.assert_array_equal(jax.random.key_data(stream_key(7, "init")),
                                  jax.random.key_data(stream_key(7, "init")))
    assert not np.array_equal(jax.random.key_data(stream_key(7, "init")),
                              jax.random.key_data(stream_key(8, "init")))
    with pytest.raises(ValueError):
        stream_key(0, "nope")
    # Chain c's key does not depend on the number of chains.
    few, many = chain_keys(stream_key(0, "sampling"), 2), chain_keys(stream_key(0, "sampling"), 5)
    np.testing.assert_array_equal(jax.random.key_data(few), jax.random.key_data(many[:2]))


@pytest.mark.parametrize("widths, bias", [((3, 4, 2), True), ((5, 1), False), ((2, 7, 7, 3), True),
                                          ((6, 3, 9, 2, 4), False)])
def test_count_params_matches_flat_size(widths, bias):
    # eval_shape traces the initializer without compiling it: the count is about shapes only.
    shapes = jax.eval_shape(lambda k: flatten(init_params(k, widths, "tanh", bias))[0], jax.random.key(0))
    d = sum(a * b + (b if bias else 0) for a, b in zip(widths[:-1], widths[1:], strict=False))
    assert shapes.shape == (d,) and count_params(widths, bias) == d


@pytest.mark.parametrize("in_dim, out_dim, target, depth, bias", [
    (32, 1, 10_000, 2, True), (32, 1, 10_000, 2, False), (10, 10, 100_000, 4, False),
    (784, 10, 50_000, 1, True), (8, 2, 330, 3, True), (3, 3, 9, 0, False)])
def test_hidden_widths_for_target_within_five_percent(in_dim, out_dim, target, depth, bias):
    hidden = hidden_widths_for_target(in_dim, out_dim, target, depth, bias)
    assert len(hidden) == depth and len(set(hidden)) <= 1
    d = count_params(full_widths(in_dim, hidden, out_dim), bias)
    assert abs(d - target) <= 0.05 * target
    if depth:  # and it is the closest equal-width choice
        h = hidden[0]
        for other in (h - 1, h + 1):
            if other >= 1:
                d_other = count_params(full_widths(in_dim, (other,) * depth, out_dim), bias)
                assert abs(d_other - target) >= abs(d - target)


def test_hidden_widths_for_target_impossible():
    with pytest.raises(ValueError):
        hidden_widths_for_target(32, 1, 10, 2, True)  # even width 1 has 35 parameters
    with pytest.raises(ValueError):
        hidden_widths_for_target(3, 3, 20, 0, False)  # no hidden layer: d = 9 is fixed


def test_init_variance_and_layer_order():
    params = init_params(jax.random.key(1), (400, 300, 2), "relu", True, scale=2.0, bias_scale=0.5)
    k0 = np.asarray(params["layer_000"]["kernel"], np.float64)
    assert k0.shape == (400, 300)
    # std of 120k N(0, 4/400) draws: relative SE of the std ≈ 1/√(2·120k) ≈ 0.2%
    assert abs(k0.std() / (2.0 / math.sqrt(400)) - 1) < 0.01
    b0 = np.asarray(params["layer_000"]["bias"], np.float64)
    assert abs(b0.std() / 0.5 - 1) < 5 / math.sqrt(2 * 300)
    assert np.all(np.asarray(init_params(jax.random.key(1), (4, 3), "relu", True)["layer_000"]["bias"]) == 0)
    # The flat vector lists layers in order (zero-padded names), bias before kernel.
    w, _ = flatten(params)
    np.testing.assert_array_equal(w[:300], params["layer_000"]["bias"])
    np.testing.assert_array_equal(w[300:300 + 400 * 300], params["layer_000"]["kernel"].ravel())


def test_apply_matches_manual_forward():
    widths = (3, 5, 4, 2)
    x = jax.random.normal(jax.random.key(2), (7, 3))
    for act, fn in (("tanh", np.tanh), ("identity", lambda h: h)):
        params = init_params(jax.random.key(3), widths, act, True, bias_scale=0.3)
        h = np.asarray(x, np.float64)
        for i in range(3):
            layer = params[f"layer_{i:03d}"]
            h = h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
            h = fn(h) if i < 2 else h
        np.testing.assert_allclose(np.asarray(make_apply(widths, act, True)(params, x)), h, rtol=1e-5, atol=1e-5)
    # A DLN computes x M with M the product of its kernels.
    params = init_params(jax.random.key(4), widths, "identity", False)
    np.testing.assert_allclose(make_apply(widths, "identity", False)(params, x),
                               x @ end_to_end_matrix(params), rtol=1e-5, atol=1e-6)


DLN_WIDTHS = (6, 5, 7, 4, 5)  # min width 4


@pytest.mark.parametrize("generator", ["rand_rank", "deepest", "chained"])
@pytest.mark.parametrize("rank", [0, 1, 2, 4])
def test_dln_teacher_has_requested_rank(generator, rank):
    for seed in range(3):
        params, measured = dln_teacher(jax.random.key(seed), DLN_WIDTHS, rank, generator)
        assert measured == rank == dln_rank(params)
        layer_ranks = [np.linalg.matrix_rank(np.asarray(k, np.float64), rtol=1e-5) for k in kernels(params)]
        assert min(layer_ranks) == rank
        if generator in ("deepest", "chained"):
            assert layer_ranks == [rank] * 4
        assert set(params["layer_000"]) == {"kernel"}  # no biases


def test_dln_teacher_rand_rank_free_and_deterministic():
    ranks = []
    for seed in range(12):
        params, r = dln_teacher(jax.random.key(seed), DLN_WIDTHS, None, "rand_rank")
        assert 1 <= r <= 4  # Lau et al. never cut a layer to rank 0
        ranks.append(r)
    assert len(set(ranks)) > 1  # the rank is random, not pinned
    _, r_full = dln_teacher(jax.random.key(0), DLN_WIDTHS, None, "deepest")
    assert r_full == 4
    a, _ = dln_teacher(jax.random.key(5), DLN_WIDTHS, 2, "rand_rank")
    b, _ = dln_teacher(jax.random.key(5), DLN_WIDTHS, 2, "rand_rank")
    for ka, kb in zip(kernels(a), kernels(b), strict=True):
        np.testing.assert_array_equal(ka, kb)
    with pytest.raises(ValueError):
        dln_teacher(jax.random.key(0), DLN_WIDTHS, 5, "deepest")
    with pytest.raises(ValueError):
        dln_teacher(jax.random.key(0), DLN_WIDTHS, 1, "nope")


def test_dln_rank_of_product_is_min_of_generic_layer_ranks():
    # Rank-1 first layer times full-rank rest: product rank 1, and the matrix is not all zeros.
    params, r = dln_teacher(jax.random.key(9), (4, 4, 4), 1, "rand_rank")
    s = np.linalg.svd(np.asarray(end_to_end_matrix(params), np.float64), compute_uv=False)
    assert r == 1 and s[0] > 1e-3 and s[1] < 1e-5 * s[0]
    assert jnp.all(end_to_end_matrix(dln_teacher(jax.random.key(0), (4, 4, 4), 0, "deepest")[0]) == 0)


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["rand_rank", "deepest"])
def test_wide_dln_teacher_rank_survives_float32(generator):
    widths = (10, 200, 200, 200, 10)
    for rank in (1, 3, 10):
        params, measured = dln_teacher(jax.random.key(rank), widths, rank, generator)
        assert measured == rank == dln_rank(params)  # float32 storage keeps the rank readable
