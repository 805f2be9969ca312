"""Analytic DLN learning coefficient against independent closed forms and invariances."""

from fractions import Fraction
from itertools import combinations, permutations, product

import pytest

from llc_bench.truth import (
    dln_learning_coefficient,
    dln_learning_coefficient_exact,
    dln_num_parameters,
    regular_learning_coefficient,
    select_subset,
)


def reduced_rank_regression_lambda(M: int, H: int, N: int, r: int) -> Fraction:
    """Aoyagi & Watanabe (2005), Main Theorem: input M, hidden H, output N, true rank r."""
    if M + H < N + r:
        return Fraction(H * M - H * r + N * r, 2)
    if N + H < M + r:
        return Fraction(H * N - H * r + M * r, 2)
    if M + N < H + r:
        return Fraction(M * N, 2)
    value = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    if (M + H + N + r) % 2 == 1:
        value += 1
    return Fraction(value, 8)


def small_grid(num_layers: int, max_width: int):
    """All (widths, rank) with num_layers + 1 widths in 1..max_width and rank in 0..min width."""
    for widths in product(range(1, max_width + 1), repeat=num_layers + 1):
        for rank in range(min(widths) + 1):
            yield list(widths), rank


def test_regular():
    assert regular_learning_coefficient(7) == 3.5
    assert regular_learning_coefficient(0) == 0.0


@pytest.mark.parametrize("h_in,h_out", [(1, 1), (3, 5), (7, 2), (10, 10)])
def test_single_layer_is_regular(h_in, h_out):
    # A single linear layer is identifiable: λ = d/2 whatever the teacher's rank.
    for rank in range(min(h_in, h_out) + 1):
        assert dln_learning_coefficient_exact([h_in, h_out], rank) == Fraction(h_in * h_out, 2)
        assert dln_learning_coefficient([h_in, h_out], rank) == regular_learning_coefficient(
            dln_num_parameters([h_in, h_out])
        )


def test_one_hidden_layer_matches_reduced_rank_regression():
    cases_seen = set()
    for (M, H, N), r in small_grid(2, 8):
        expected = reduced_rank_regression_lambda(M, H, N, r)
        assert dln_learning_coefficient_exact([M, H, N], r) == expected, (M, H, N, r)
        if M + H < N + r:
            cases_seen.add("M+H<N+r")
        elif N + H < M + r:
            cases_seen.add("N+H<M+r")
        elif M + N < H + r:
            cases_seen.add("M+N<H+r")
        else:
            cases_seen.add("even" if (M + H + N + r) % 2 == 0 else "odd")
    assert cases_seen == {"M+H<N+r", "N+H<M+r", "M+N<H+r", "even", "odd"}


@pytest.mark.parametrize(
    "M,H,N,r,expected",
    [
        (2, 2, 2, 0, Fraction(3, 2)),  # Aoyagi's global value for [2, 2, 2], r = 0
        (5, 3, 5, 0, Fraction(2 * 3 * 10 - 0 - 9 + 1, 8)),  # odd case
        (3, 2, 3, 0, Fraction(2 * 2 * 6 - 0 - 4, 8)),  # even case
        (4, 3, 8, 0, Fraction(12, 2)),  # M + H < N + r: HM / 2
        (8, 3, 4, 1, Fraction(3 * 4 - 3 + 8, 2)),  # N + H < M + r
        (3, 8, 4, 0, Fraction(12, 2)),  # M + N < H + r: regular
    ],
)
def test_reduced_rank_regression_pinned(M, H, N, r, expected):
    assert reduced_rank_regression_lambda(M, H, N, r) == expected
    assert dln_learning_coefficient_exact([M, H, N], r) == expected


def test_water_filling_subset_is_unique():
    # Brute force over all subsets: exactly one satisfies Aoyagi's conditions, and it is ours.
    for widths, rank in list(small_grid(3, 5)) + list(small_grid(4, 4)):
        reduced = [h - rank for h in widths]
        matches = []
        for size in range(1, len(reduced) + 1):
            for subset in combinations(range(len(reduced)), size):
                inside = [reduced[i] for i in subset]
                outside = [reduced[i] for i in range(len(reduced)) if i not in subset]
                ell = size - 1
                ok = sum(inside) >= ell * max(inside) and (
                    not outside or (max(inside) < min(outside) and sum(inside) < ell * min(outside))
                )
                if ok:
                    matches.append(subset)
        assert matches == [select_subset(reduced)], (widths, rank, matches)


def test_reversal_and_hidden_permutation_invariance():
    # The transpose network (x -> W^T x) has the same loss geometry; hidden widths enter only via Σ.
    for widths, rank in small_grid(3, 5):
        value = dln_learning_coefficient_exact(widths, rank)
        assert dln_learning_coefficient_exact(widths[::-1], rank) == value
        for hidden in permutations(widths[1:-1]):
            assert dln_learning_coefficient_exact([widths[0], *hidden, widths[-1]], rank) == value


def test_bounded_by_half_dimension():
    for widths, rank in list(small_grid(2, 6)) + list(small_grid(3, 5)) + list(small_grid(4, 3)):
        value = dln_learning_coefficient_exact(widths, rank)
        assert value > 0, (widths, rank)
        assert value <= Fraction(dln_num_parameters(widths), 2), (widths, rank)
        # Never below the regular count of the smooth part: the rank-r manifold of end-to-end maps.
        h_in, h_out = widths[0], widths[-1]
        assert value >= Fraction(rank * (h_in + h_out) - rank * rank, 2), (widths, rank)


@pytest.mark.parametrize("h_in,h_out,rank", [(2, 3, 0), (3, 3, 2), (4, 2, 1), (1, 5, 1)])
def test_wide_hidden_layers_give_regular_end_to_end(h_in, h_out, rank):
    # Hidden layers with H - r > (H_in - r) + (H_out - r) never bottleneck: λ = H_in H_out / 2, the
    # value of one free end-to-end matrix (RRR case M + N < H + r, extended to any depth).
    wide = h_in + h_out
    for depth in range(1, 5):
        widths = [h_in, *[wide + k for k in range(depth)], h_out]
        assert dln_learning_coefficient_exact(widths, rank) == Fraction(h_in * h_out, 2)


def test_inserting_a_very_wide_layer_changes_nothing():
    for widths, rank in small_grid(3, 4):
        huge = 10 * sum(widths)
        for position in range(1, len(widths)):
            extended = [*widths[:position], huge, *widths[position:]]
            assert dln_learning_coefficient_exact(extended, rank) == dln_learning_coefficient_exact(
                widths, rank
            )


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 8])
def test_scalar_chain(depth):
    # f = w_1 ... w_L. Teacher 0: K = (w_1 ... w_L)^2, a normal crossing monomial, RLCT = 1/2 at any
    # depth (depth 1: w², also 1/2). Teacher != 0: {Π w = c} is a smooth hypersurface, 1/2.
    assert dln_learning_coefficient_exact([1] * (depth + 1), 0) == Fraction(1, 2)
    assert dln_learning_coefficient_exact([1] * (depth + 1), 1) == Fraction(1, 2)


@pytest.mark.parametrize(
    "widths,rank,expected",
    [
        # M = [2,2,2,2], Σ = all, ℓ = 3, S = 8, ⌈8/3⌉ = 3, a = 2: 2/12 - 2·64/12 + 6·4/2 = 3/2
        ([2, 2, 2, 2], 0, Fraction(3, 2)),
        # M = [5,1,5,5], Σ = all, ℓ = 3, S = 16, a = 1: 2/12 - 512/12 + 90/2 = 5/2
        ([5, 1, 5, 5], 0, Fraction(5, 2)),
        # M = [2,1,3,1] (r = 1), Σ = {0,1,3}: ℓ = 2, S = 4, a = 2: 0 - 16/8 + 5/2, plus
        # (r (H_in + H_out) - r²)/2 = (5 - 1)/2 = 2
        ([3, 2, 4, 2], 1, Fraction(5, 2)),
        # M = [3,3,3,3,3], Σ = all, ℓ = 4, S = 15, ⌈15/4⌉ = 4, a = 3: 3/16 - 3·225/16 + 10·9/2 = 3
        ([3, 3, 3, 3, 3], 0, Fraction(3, 16) - Fraction(675, 16) + 45),
    ],
)
def test_hand_checked_multilayer(widths, rank, expected):
    assert dln_learning_coefficient_exact(widths, rank) == expected


@pytest.mark.parametrize(
    "widths,rank",
    [([3], 0), ([], 0), ([3, 0, 2], 0), ([3, -1, 2], 0), ([3, 4], -1), ([3, 2, 4], 3)],
)
def test_invalid_inputs(widths, rank):
    with pytest.raises(ValueError):
        dln_learning_coefficient(widths, rank)
