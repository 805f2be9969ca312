"""Model zoo: a flax.linen MLP (identity + no bias = deep linear network), sizing helpers, DLN teachers."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

Params = dict  # flax parameter tree: {"layer_000": {"kernel": (in, out), "bias": (out,)}, ...}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "identity": lambda h: h,
}


def layer_name(i: int) -> str:
    # Zero-padded so that the sorted-key order of ravel_pytree is the layer order (Dense_10 < Dense_2).
    return f"layer_{i:03d}"


class MLP(nn.Module):
    """f(x) = W_L^T σ(… σ(W_1^T x + b_1) …) + b_L; `features` are the output widths of each layer.

    Kernels have shape (fan_in, fan_out) and are drawn N(0, kernel_scale² / fan_in); biases are
    drawn N(0, bias_scale²) (zero by default, the usual student init).
    """

    features: tuple[int, ...]
    activation: str = "relu"
    use_bias: bool = True
    kernel_scale: float = 1.0
    bias_scale: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        kernel_init = nn.initializers.variance_scaling(self.kernel_scale**2, "fan_in", "normal")
        bias_init = (nn.initializers.normal(self.bias_scale) if self.bias_scale > 0
                     else nn.initializers.zeros)
        for i, width in enumerate(self.features):
            x = nn.Dense(width, use_bias=self.use_bias, kernel_init=kernel_init,
                         bias_init=bias_init, name=layer_name(i))(x)
            if i < len(self.features) - 1:
                x = act(x)
        return x


def full_widths(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> tuple[int, ...]:
    """H = (H_in, H_1, …, H_out): the widths of every layer boundary, the form DLN theory uses."""
    return (int(in_dim), *(int(h) for h in hidden), int(out_dim))


def count_params(widths_full: tuple[int, ...], bias: bool) -> int:
    """d = Σ_l H_{l-1} H_l (+ Σ_l H_l with biases)."""
    pairs = zip(widths_full[:-1], widths_full[1:], strict=True)
    return sum(a * b + (b if bias else 0) for a, b in pairs)


def hidden_widths_for_target(in_dim: int, out_dim: int, target_params: int, depth: int,
                             bias: bool) -> tuple[int, ...]:
    """Equal hidden widths (h,)*depth whose parameter count is closest to target_params.

    d(h) = in·h + (depth−1)·h² + h·out (+ depth·h + out) is increasing in h, so the best h is one of
    the two integers around the root of d(h) = target. Raises ValueError when the best count is
    more than 5% away from the target (e.g. a target below the smallest network's size).
    """
    if target_params <= 0 or depth < 0:
        raise ValueError(f"need target_params > 0 and depth >= 0, got {target_params}, {depth}")
    if depth == 0:
        candidates = [()]
    else:
        a, b, c = depth - 1, in_dim + out_dim + (depth if bias else 0), (out_dim if bias else 0)
        c -= target_params
        root = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        base = max(1, math.floor(root))
        candidates = [(h,) * depth for h in (base, base + 1)]

    def rel_error(hidden):
        return abs(count_params(full_widths(in_dim, hidden, out_dim), bias) - target_params) / target_params

    best = min(candidates, key=rel_error)
    if rel_error(best) > 0.05:
        d = count_params(full_widths(in_dim, best, out_dim), bias)
        raise ValueError(f"cannot size a depth-{depth} network with in_dim={in_dim}, out_dim={out_dim} "
                         f"to {target_params} parameters within 5% (closest: {best} with {d})")
    return best


def init_params(key: jax.Array, widths_full: tuple[int, ...], activation: str, bias: bool,
                scale: float = 1.0, bias_scale: float = 0.0) -> Params:
    """Random MLP parameters: kernels N(0, scale²/fan_in), biases N(0, bias_scale²)."""
    del activation  # the parameters' shapes and laws do not depend on it; one compile serves all
    widths_full = tuple(int(h) for h in widths_full)
    return _init_params(key, widths_full, bias, float(scale), float(bias_scale))


# One compiled program per architecture: eager flax init dispatches (and compiles) op by op.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_params(key, widths_full, bias, scale, bias_scale) -> Params:
    model = MLP(widths_full[1:], "identity", bias, scale, bias_scale)
    return model.init(key, jnp.zeros((1, widths_full[0])))["params"]


def flatten(params: Params) -> tuple[jax.Array, Callable[[jax.Array], Params]]:
    """(w_flat (d,), unravel): layers in order, within a layer bias before kernel (sorted keys)."""
    return ravel_pytree(params)


def make_apply(widths_full: tuple[int, ...], activation: str, bias: bool
               ) -> Callable[[Params, jax.Array], jax.Array]:
    """apply(params, x (m, H_in)) -> (m, H_out)."""
    model = MLP(tuple(widths_full[1:]), activation, bias)

    # Jitted so that eager callers compile one program instead of dispatching op by op; inside
    # other jitted code the inner jit is inlined.
    @jax.jit
    def apply(params: Params, x: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x)

    return apply


def kernels(params: Params) -> list[jax.Array]:
    """The layer kernels in order, each (H_{l-1}, H_l)."""
    return [params[name]["kernel"] for name in sorted(params)]


def end_to_end_matrix(params: Params) -> jax.Array:
    """M = W_1 W_2 … W_L (H_in, H_out): a DLN computes f(x) = x M (row-vector convention)."""
    out = kernels(params)[0]
    for w in kernels(params)[1:]:
        out = out @ w
    return out


def _truncate_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The best rank-`rank` approximation: keep the top singular values, zero the rest."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    s[rank:] = 0.0
    return (u * s) @ vt


DLN_GENERATORS = ("chained", "rand_rank", "deepest")
# Spread of the per-layer share of each end-to-end singular value in the chained generator: layer l
# carries σ_i^(1/L)·exp(z_li) with z_li ~ N(0, 0.3²) centred over l, so the layers are not exactly
# balanced while their product keeps exactly the drawn σ_i.
CHAINED_LAYER_SPREAD = 0.3


def dln_teacher(key: jax.Array, widths_full: tuple[int, ...], rank: int | None = None,
                generator: str = "rand_rank", scale: float = 1.0,
                sv_band: tuple[float, float] = (1.0, 2.0)) -> tuple[Params, int]:
    """A deep linear teacher (identity, no bias) and the measured rank of its end-to-end matrix.

    The layers are built in float64 by `dln_teacher_layers` (see there for the generators) and
    stored in float32. Returns (params, rank): rank = numpy.linalg.matrix_rank of the float64
    product; raises ValueError if it differs from the requested rank.
    """
    layers, measured = dln_teacher_layers(key, widths_full, rank, generator, scale, sv_band)
    params = {layer_name(i): {"kernel": jnp.asarray(w, dtype=jnp.float32)} for i, w in enumerate(layers)}
    return params, measured


def dln_teacher_layers(key: jax.Array, widths_full: tuple[int, ...], rank: int | None = None,
                       generator: str = "rand_rank", scale: float = 1.0,
                       sv_band: tuple[float, float] = (1.0, 2.0)) -> tuple[list[np.ndarray], int]:
    """The float64 layer matrices W_1, …, W_L (W_l of shape (H_{l-1}, H_l)) of a DLN teacher, and
    the rank of their product. A pure function of the key.

    - "chained": every layer of rank exactly r with the rank-r subspaces lined up:
      W_l = U_{l-1} diag(s_l) U_lᵀ with U_l (H_l × r) random orthonormal, so the end-to-end map
      is M = U_0 diag(σ) U_Lᵀ with σ_i = Π_l s_li drawn uniformly from `sv_band` (every direction
      of M is as large as a layer's own). Every layer has the minimal rank r, the stratum of the
      true set where Aoyagi's (global) λ is the local one. `scale` is not used: the band sets it.
    - "rand_rank" (as in Lau et al., AISTATS 2025, App. E): layers start as Gaussian
      N(0, scale²/fan_in) matrices; each, independently with probability ½, is cut (smallest
      singular values zeroed) to a rank uniform in {1, …, full}. With `rank=None` the end-to-end
      rank is whatever results. With `rank=r`, one layer chosen uniformly is cut to r and the
      others, with probability ½, to a rank uniform in {r, …, full}, so the product has rank r.
    - "deepest": the Gaussian layers, every one cut to rank exactly r (r = min(widths_full) when
      rank is None).

    Caveat (rand_rank and deepest): Gaussian layers cut to rank r multiply through random
    r-dimensional alignments, so the end-to-end singular values can be many orders below each
    layer's own (1e-3…1e-6 on 10K-parameter teachers). At finite n such directions are
    statistically invisible; `llc_bench.wellposed` measures this.
    """
    widths_full = tuple(int(h) for h in widths_full)
    if generator not in DLN_GENERATORS:
        raise ValueError(f"unknown DLN generator {generator!r}; known: {', '.join(DLN_GENERATORS)}")
    if rank is not None and not 0 <= rank <= min(widths_full):
        raise ValueError(f"rank {rank} must lie in [0, min(widths) = {min(widths_full)}]")
    k_init, k_ranks = jax.random.split(key)
    # The discrete choices (and the chained factors) are host-side numpy draws seeded by the key's
    # bits: still a pure function of the key, without compiling a JAX sampler for a few numbers.
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_ranks)).tolist())
    if generator == "chained":
        layers = _chained_layers(rng, widths_full, min(widths_full) if rank is None else rank, sv_band)
    else:
        layers = _cut_gaussian_layers(k_init, rng, widths_full, rank, generator, scale)
    # Measured on the float64 construction, where cut singular values are zero to ~1e-16.
    measured = _product_rank(layers)
    if rank is not None and measured != rank:
        raise ValueError(f"DLN teacher has end-to-end rank {measured}, requested {rank}")
    return layers, measured


def _chained_layers(rng: np.random.Generator, widths_full: tuple[int, ...], r: int,
                    sv_band: tuple[float, float]) -> list[np.ndarray]:
    lo, hi = float(sv_band[0]), float(sv_band[1])
    if not 0 < lo <= hi:
        raise ValueError(f"sv_band must satisfy 0 < low <= high, got {list(sv_band)}")
    num_layers = len(widths_full) - 1
    bases = [np.linalg.qr(rng.standard_normal((h, r)))[0] if r else np.zeros((h, 0)) for h in widths_full]
    sigma = np.sort(rng.uniform(lo, hi, r))[::-1]
    z = CHAINED_LAYER_SPREAD * rng.standard_normal((num_layers, r))
    z -= z.mean(axis=0)
    shares = np.exp(np.log(sigma)[None, :] / num_layers + z)  # (L, r): column products = σ
    return [(bases[l] * shares[l]) @ bases[l + 1].T for l in range(num_layers)]


def _cut_gaussian_layers(key: jax.Array, rng: np.random.Generator, widths_full: tuple[int, ...],
                         rank: int | None, generator: str, scale: float) -> list[np.ndarray]:
    num_layers = len(widths_full) - 1
    params = init_params(key, widths_full, "identity", False, scale)
    full = [min(a, b) for a, b in zip(widths_full[:-1], widths_full[1:], strict=True)]
    coin = rng.random(num_layers) < 0.5
    uniform = rng.random(num_layers)
    forced = int(rng.integers(num_layers))

    def uniform_int(u: float, lo: int, hi: int) -> int:  # uniform on {lo, …, hi}
        return lo + min(int(u * (hi - lo + 1)), hi - lo)

    if generator == "deepest":
        r = min(widths_full) if rank is None else rank
        layer_ranks = [r] * num_layers
    elif rank is None:
        layer_ranks = [uniform_int(u, 1, f) if c else f for c, u, f in zip(coin, uniform, full, strict=True)]
    else:
        layer_ranks = [uniform_int(u, rank, f) if c else f for c, u, f in zip(coin, uniform, full, strict=True)]
        layer_ranks[forced] = rank
    return [_truncate_rank(np.asarray(params[name]["kernel"], np.float64), k)
            for name, k in zip(sorted(params), layer_ranks, strict=True)]


def _product_rank(mats: list[np.ndarray], rtol: float | None = None) -> int:
    out = mats[0]
    for w in mats[1:]:
        out = out @ w
    return int(np.linalg.matrix_rank(out, rtol=rtol))


def dln_rank(params: Params) -> int:
    """numpy matrix_rank of the end-to-end matrix M = W_1 … W_L of stored (e.g. float32) kernels.

    The product is taken in float64, but in float32 storage a zero singular value survives as
    rounding noise of relative size ~eps32; so singular values below
    σ_max · max(H_in, H_out) · L · eps(kernel dtype) count as zero (numpy's default tolerance,
    scaled to the storage precision and the depth).
    """
    ws = kernels(params)
    eps = float(jnp.finfo(ws[0].dtype).eps)
    mats = [np.asarray(w, dtype=np.float64) for w in ws]
    shape = (mats[0].shape[0], mats[-1].shape[1])
    return _product_rank(mats, rtol=max(shape) * len(ws) * eps)
