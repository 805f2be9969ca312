"""The target stage, config → (data, teacher, w*): everything the posterior needs, built from named RNG streams."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from llc_bench.config import Config
from llc_bench.data import add_noise, per_sample_nll, sample_inputs
from llc_bench.models import (
    Params,
    dln_rank,
    dln_teacher,
    dln_teacher_layers,
    flatten,
    full_widths,
    hidden_widths_for_target,
    init_params,
    make_apply,
)
from llc_bench.posterior import PerSampleLoss
from llc_bench.rng import stream_key
from llc_bench.train import TrainReport, train_erm
from llc_bench.truth import dln_learning_coefficient


@dataclass(frozen=True, eq=False)
class Target:
    """A teacher–student problem and its trained student w*.

    per_sample_loss(w_flat, x, y) = per_sample_nll(apply_fn(unravel(w_flat), x), y, x), shape (m,).
    apply_fn(params_tree, x (m, in_dim)) -> (m, out_dim) takes the *unravelled* parameter tree.
    `widths` are the student's full widths (H_in, H_1, …, H_out), d its parameter count.
    `teacher_rank` is the measured rank of the teacher's end-to-end matrix when the teacher is
    linear (kind "dln", or an identity MLP without bias), else None; `generator` is the DLN
    generator used, else None. `truth` is the analytic λ (Aoyagi) when the student is a deep linear
    network that can represent the teacher, else None.
    """

    x: jax.Array  # (n, in_dim)
    y: jax.Array  # (n, out_dim)
    w_star: jax.Array  # (d,)
    unravel: Callable[[jax.Array], Params]
    apply_fn: Callable[[Params, jax.Array], jax.Array]
    per_sample_loss: PerSampleLoss
    widths: tuple[int, ...]
    d: int
    teacher_rank: int | None
    generator: str | None
    train_report: TrainReport | None
    truth: float | None
    teacher_params: Params
    teacher_widths: tuple[int, ...]
    student_activation: str
    student_bias: bool


def student_widths(cfg: Config) -> tuple[int, ...]:
    """The student's full widths: cfg.model.widths, or equal hidden widths sized to target_params."""
    m, data = cfg.model, cfg.data
    hidden = m.widths if m.widths is not None else hidden_widths_for_target(
        data.in_dim, data.out_dim, m.target_params, m.depth, m.bias)
    return full_widths(data.in_dim, hidden, data.out_dim)


def build_teacher(cfg: Config) -> tuple[Params, tuple[int, ...], str, bool, int | None, str | None]:
    """(params, full widths, activation, bias, rank, generator) of the teacher from cfg.teacher.

    kind "dln": dln_teacher with cfg.teacher.rank / generator (identity, no bias; the teacher's
    activation and bias settings are ignored). kind "mlp": a random MLP with kernels
    N(0, weight_scale²/fan_in) and biases N(0, weight_scale²), so that ReLU kinks fall inside the
    data (zero biases would put every hyperplane through the origin).
    """
    t, data = cfg.teacher, cfg.data
    key = stream_key(cfg.run.seed, "teacher")
    widths = full_widths(data.in_dim, t.widths, data.out_dim)
    if t.kind == "dln":
        params, rank = dln_teacher(key, widths, t.rank, t.generator, t.weight_scale, t.sv_band)
        return params, widths, "identity", False, rank, t.generator
    if t.kind == "mlp":
        params = init_params(key, widths, t.activation, t.bias, t.weight_scale,
                             t.weight_scale if t.bias else 0.0)
        linear = t.activation == "identity" and not t.bias
        return params, widths, t.activation, t.bias, (dln_rank(params) if linear else None), None
    raise ValueError(f"unknown teacher kind {t.kind!r}; known: mlp, dln")


def dln_teacher_layers64(cfg: Config) -> list:
    """The float64 layers of cfg's DLN teacher (the same draw `build_teacher` stores in float32)."""
    t, data = cfg.teacher, cfg.data
    if t.kind != "dln":
        raise ValueError(f"teacher.kind must be 'dln' (got {t.kind!r})")
    widths = full_widths(data.in_dim, t.widths, data.out_dim)
    return dln_teacher_layers(stream_key(cfg.run.seed, "teacher"), widths, t.rank, t.generator,
                              t.weight_scale, t.sv_band)[0]


def build_target(cfg: Config, progress: bool = False) -> Target:
    """Draw x, build the teacher, y = teacher(x) + noise, size and train the student.

    Streams: "data" (x), "teacher", "noise" (y − teacher(x)), "init" (student w0), "training"
    (minibatches). With cfg.train.use_teacher, w* is the teacher's parameters (the DLN benchmark
    protocol), which needs the student to be the teacher's architecture exactly.
    """
    seed, data = cfg.run.seed, cfg.data
    x = sample_inputs(stream_key(seed, "data"), data)
    teacher, t_widths, t_act, t_bias, t_rank, generator = build_teacher(cfg)
    y = add_noise(stream_key(seed, "noise"), x, make_apply(t_widths, t_act, t_bias)(teacher, x), data)

    m = cfg.model
    widths = student_widths(cfg)
    apply_fn = make_apply(widths, m.activation, m.bias)
    w0, unravel = flatten(init_params(stream_key(seed, "init"), widths, m.activation, m.bias))
    nll = per_sample_nll(data)

    def per_sample_loss(w_flat: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        return nll(apply_fn(unravel(w_flat), x), y, x)

    if cfg.train.use_teacher:
        if (widths, m.activation, m.bias) != (t_widths, t_act, t_bias):
            raise ValueError(
                f"train.use_teacher needs the student to equal the teacher: student widths {widths}, "
                f"activation {m.activation}, bias {m.bias}; teacher {t_widths}, {t_act}, {t_bias}")
        w_star, report = flatten(teacher)[0], None
    else:
        def loss_fn(w, x, y):
            return jnp.mean(per_sample_loss(w, x, y))

        w_star, report = train_erm(stream_key(seed, "training"), loss_fn, w0, x, y, cfg.train,
                                   progress=progress)

    return Target(
        x=x, y=y, w_star=w_star, unravel=unravel, apply_fn=apply_fn,
        per_sample_loss=per_sample_loss, widths=widths, d=int(w_star.shape[0]),
        teacher_rank=t_rank, generator=generator, train_report=report,
        truth=_dln_truth(widths, m.activation, m.bias, t_rank),
        teacher_params=teacher, teacher_widths=t_widths,
        student_activation=m.activation, student_bias=m.bias,
    )


def _dln_truth(widths: tuple[int, ...], activation: str, bias: bool, teacher_rank: int | None
               ) -> float | None:
    """Aoyagi's λ for a DLN student whose teacher is linear of rank r ≤ min(widths) (realizable)."""
    if activation != "identity" or bias or teacher_rank is None or teacher_rank > min(widths):
        return None
    return float(dln_learning_coefficient(widths, teacher_rank))
