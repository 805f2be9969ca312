"""Is Aoyagi's λ the right answer for this DLN teacher at this n? Visibility of its directions, and local versus global λ.

Aoyagi's formula gives the learning coefficient of the whole set of true parameters of a deep
linear network (DLN) whose teacher has end-to-end rank r. A sampler at finite n around one
particular teacher reads that number only if two things hold; both are decided here from the
teacher's layers in float64.

**Visibility.** Dropping direction i of the end-to-end map M* = Σ_i σ_i u_i v_iᵀ (σ descending,
u_i on the input side) raises nβ·L_n by the energy

    E_i = ½ · nβ · σ_i² · u_iᵀ Σ_x u_i          (Σ_x = E[x xᵀ]; loss ½‖y − xM‖²)

and lowers the free energy by (λ(i) − λ(i−1)) · log nβ, λ(k) being Aoyagi's λ at rank k. If the
energy does not clearly exceed that gain, the tempered posterior puts its mass on rank < i and
even an exact sampler reads λ(i−1)-ish. Direction i counts as *visible* when E_i ≥ margin × gain
(default margin 10); r_eff is the number of leading visible directions and λ(r_eff) the value an
exact sampler is expected to approach instead.

**Local versus global.** Aoyagi's λ is the minimum over the true set; at a given teacher the local
λ can be larger. It is at least rank(H)/2, H the Hessian of L at w*; for a DLN with full-rank
input covariance rank H equals the rank of the Jacobian of w ↦ M(w),

    rank J = Σ_l u_l · (v_l − v_{l−1}),   u_l = rank(W_1⋯W_{l−1}) (u_1 = H_in),
                                          v_l = rank(W_{l+1}⋯W_L) (v_L = H_out, v_0 = 0),

because the image of layer l's perturbations is col(W_1⋯W_{l−1}) ⊗ row(W_{l+1}⋯W_L), and these
column spaces shrink while the row spaces grow with l. When every layer has rank exactly r (the
deepest stratum of the true set, which the network's symmetries act on transitively) the local λ
is the global one. A teacher with a layer of larger rank lies on a shallower stratum: its local λ
is only known to be ≥ max(λ, rank(H)/2).

A teacher is *well-posed* when both hold: every direction visible (r_eff = r) and every layer of
rank r. Only well-posed instances are scored against Aoyagi's λ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llc_bench.truth import dln_learning_coefficient

DEFAULT_MARGIN = 10.0


def _rank(matrix: np.ndarray) -> int:
    return int(np.linalg.matrix_rank(matrix)) if matrix.size else 0


def _chain(layers: Sequence[np.ndarray], lo: int, hi: int, size: int) -> np.ndarray:
    """W_lo ⋯ W_{hi−1} (0-based layer indices), the identity of `size` when empty."""
    out = np.eye(size)
    for w in layers[lo:hi]:
        out = out @ w
    return out


def layer_ranks(layers: Sequence[np.ndarray]) -> list[int]:
    return [_rank(np.asarray(w, np.float64)) for w in layers]


def hessian_rank(layers: Sequence[np.ndarray]) -> int:
    """rank J = Σ_l u_l (v_l − v_{l−1}) of the map (dW_1, …, dW_L) ↦ dM (see the module docstring)."""
    layers = [np.asarray(w, np.float64) for w in layers]
    num = len(layers)
    u = [_rank(_chain(layers, 0, l, layers[0].shape[0])) for l in range(num)]
    v = [_rank(_chain(layers, l + 1, num, layers[l].shape[1])) for l in range(num)]
    total, previous = 0, 0
    for l in range(num):
        total += u[l] * (v[l] - previous)
        previous = v[l]
    return total


@dataclass(frozen=True)
class Visibility:
    sigma: np.ndarray  # end-to-end singular values, descending (the first `rank` of them)
    energy: np.ndarray  # ½ nβ σ_i² u_iᵀ Σ_x u_i
    gain: np.ndarray  # (λ(i) − λ(i−1)) log nβ
    r_eff: int


def visibility(layers: Sequence[np.ndarray], widths: Sequence[int], rank: int, n_beta: float,
               second_moment: np.ndarray | float, margin: float = DEFAULT_MARGIN) -> Visibility:
    """Energy and free-energy gain of each of the `rank` directions of M*, and r_eff."""
    layers = [np.asarray(w, np.float64) for w in layers]
    m_star = _chain(layers, 0, len(layers), layers[0].shape[0])
    u, s, _ = np.linalg.svd(m_star, full_matrices=False)
    u, s = u[:, :rank], s[:rank]
    cov = np.asarray(second_moment, np.float64)
    if cov.ndim == 0:
        cov = cov * np.eye(m_star.shape[0])
    energy = 0.5 * n_beta * s**2 * np.einsum("ki,kl,li->i", u, cov, u)
    lam = [dln_learning_coefficient(widths, k) for k in range(rank + 1)]
    gain = np.diff(lam) * math.log(n_beta)
    visible = energy >= margin * gain
    r_eff = int(np.argmin(visible)) if not visible.all() else rank
    return Visibility(sigma=s, energy=energy, gain=np.asarray(gain), r_eff=r_eff)


@dataclass(frozen=True)
class WellPosedness:
    """The record of one DLN teacher at one (n, nβ); see the module docstring."""

    rank: int
    layer_ranks: tuple[int, ...]
    sv_min: float  # smallest nonzero end-to-end singular value (of the first `rank`)
    sv_max: float
    r_eff: int
    margin: float
    aoyagi: float  # λ(r), the global learning coefficient
    lambda_r_eff: float  # λ(r_eff)
    hessian_rank: int
    local_lower: float  # rank(H)/2, a lower bound of the local λ
    well_posed: bool
    reason: str  # "" when well-posed, else why not

    @property
    def truth(self) -> float | None:
        """The value to score against: Aoyagi's λ when well-posed, else None (not known)."""
        return self.aoyagi if self.well_posed else None


def assess(layers: Sequence[np.ndarray], n_beta: float, second_moment: np.ndarray | float,
           margin: float = DEFAULT_MARGIN) -> WellPosedness:
    """The well-posedness record of the teacher `layers` (float64, W_l of shape (H_{l−1}, H_l))."""
    layers = [np.asarray(w, np.float64) for w in layers]
    widths = [layers[0].shape[0]] + [w.shape[1] for w in layers]
    m_star = _chain(layers, 0, len(layers), widths[0])
    rank = _rank(m_star)
    vis = visibility(layers, widths, rank, n_beta, second_moment, margin)
    ranks = tuple(layer_ranks(layers))
    h_rank = hessian_rank(layers)
    aoyagi = dln_learning_coefficient(widths, rank)
    reasons = []
    if vis.r_eff < rank:
        reasons.append(f"invisible directions (r_eff {vis.r_eff} < r {rank})")
    if h_rank / 2 > aoyagi + 1e-9:
        reasons.append(f"local > global (rank(H)/2 = {h_rank / 2:g} > λ = {aoyagi:g})")
    elif any(k != rank for k in ranks):
        reasons.append(f"a layer above rank {rank} (local λ unknown, >= λ)")
    return WellPosedness(
        rank=rank, layer_ranks=ranks, sv_min=float(vis.sigma.min()) if rank else math.nan,
        sv_max=float(vis.sigma.max()) if rank else math.nan, r_eff=vis.r_eff, margin=margin,
        aoyagi=aoyagi, lambda_r_eff=dln_learning_coefficient(widths, vis.r_eff), hessian_rank=h_rank,
        local_lower=h_rank / 2, well_posed=not reasons, reason="; ".join(reasons))
