"""Analytic learning coefficients: deep linear networks (Aoyagi 2024) and regular models (d/2)."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from itertools import combinations


def regular_learning_coefficient(d: int) -> float:
    """λ = d / 2 for a regular (identifiable, non-degenerate Fisher information) model with d parameters."""
    if d < 0:
        raise ValueError(f"number of parameters must be >= 0, got {d}")
    return d / 2


def _validate(widths: Sequence[int], rank: int) -> tuple[int, ...]:
    widths = tuple(int(h) for h in widths)
    if len(widths) < 2:
        raise ValueError(f"widths must list at least [H_in, H_out], got {list(widths)}")
    if any(h <= 0 for h in widths):
        raise ValueError(f"widths must be positive integers, got {list(widths)}")
    if not 0 <= rank <= min(widths):
        raise ValueError(
            f"rank must be in [0, min(widths)] = [0, {min(widths)}], got {rank} for widths {list(widths)}"
        )
    return widths


def _satisfies_rule(subset: Sequence[int], complement: Sequence[int]) -> bool:
    """Aoyagi's conditions on Σ (|Σ| = ℓ + 1) for the reduced widths M.

    max_{Σ} M < min_{∁Σ} M,   Σ_{Σ} M >= ℓ max_{Σ} M,   Σ_{Σ} M < ℓ min_{∁Σ} M
    (conditions on the complement are vacuous when it is empty).
    """
    ell = len(subset) - 1
    total = sum(subset)
    if total < ell * max(subset):
        return False
    if complement:
        return max(subset) < min(complement) and total < ell * min(complement)
    return True


def select_subset(reduced_widths: Sequence[int]) -> tuple[int, ...]:
    """Indices Σ chosen by the water-filling rule, smallest reduced widths first.

    The first condition forces Σ to be a prefix of the ascending order (ties never split), so the
    prefixes are the only candidates; Aoyagi proves exactly one satisfies the rule (tested by brute
    force over all subsets in tests/test_truth.py).
    """
    order = sorted(range(len(reduced_widths)), key=lambda s: reduced_widths[s])
    values = [reduced_widths[s] for s in order]
    for size in range(1, len(values) + 1):
        if _satisfies_rule(values[:size], values[size:]):
            return tuple(sorted(order[:size]))
    raise RuntimeError(f"no subset satisfies Aoyagi's rule for M = {list(reduced_widths)}")


def dln_learning_coefficient_exact(widths: Sequence[int], rank: int) -> Fraction:
    """λ of a deep linear network as an exact Fraction (Aoyagi 2024, Neural Networks, doi:10.1016/j.neunet.2024.106132).

    widths = [H_in, H_1, ..., H_out], rank r of the teacher's end-to-end matrix.
    M_s = H_s - r; Σ from `select_subset`, ℓ = |Σ| - 1, S = Σ_{σ∈Σ} M_σ,
    M = ⌈S / ℓ⌉, a = S - (M - 1) ℓ  (so a ∈ {1, ..., ℓ}; a = ℓ when ℓ divides S):

        λ = (r (H_in + H_out) - r²) / 2 + a (ℓ - a) / (4ℓ) - (ℓ - 1) S² / (4ℓ)
            + ½ Σ_{i<j ∈ Σ} M_i M_j.

    The remainder term a (ℓ - a) / (4ℓ) is the parity correction (+1/8 for the odd case of reduced-rank
    regression). Validated against Aoyagi & Watanabe (2005) for one hidden layer and λ = H_in H_out / 2
    for a single layer.
    """
    widths = _validate(widths, rank)
    r = rank
    reduced = [h - r for h in widths]
    sigma = select_subset(reduced)
    m = [reduced[s] for s in sigma]
    ell = len(m) - 1
    # ℓ = 0 would need M_σ < 0 for the last condition; impossible with >= 2 layers and r <= min width.
    assert ell >= 1, (widths, rank, sigma)
    total = sum(m)
    ceil_mean = -(-total // ell)
    a = total - (ceil_mean - 1) * ell
    pair_sum = sum(m[i] * m[j] for i, j in combinations(range(len(m)), 2))
    return (
        Fraction(r * (widths[0] + widths[-1]) - r * r, 2)
        + Fraction(a * (ell - a), 4 * ell)
        - Fraction((ell - 1) * total * total, 4 * ell)
        + Fraction(pair_sum, 2)
    )


def dln_learning_coefficient(widths: Sequence[int], rank: int) -> float:
    """λ of a deep linear network with widths [H_in, H_1, ..., H_out] and teacher rank r (float).

    See `dln_learning_coefficient_exact` for the formula (computed in exact rational arithmetic).
    """
    return float(dln_learning_coefficient_exact(widths, rank))


def dln_num_parameters(widths: Sequence[int]) -> int:
    """d = Σ_s H_s H_{s+1} (no biases)."""
    widths = _validate(widths, 0)
    return sum(widths[i] * widths[i + 1] for i in range(len(widths) - 1))
