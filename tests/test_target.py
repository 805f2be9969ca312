"""The target stage: ERM recovers a DLN teacher, seeds reproduce bit for bit, sizing, use_teacher, truth."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from llc_bench.config import Config, DataConfig, ModelConfig, RunConfig, TeacherConfig, TrainConfig
from llc_bench.models import count_params, end_to_end_matrix, flatten, make_apply
from llc_bench.target import build_target, build_teacher, student_widths

SIGMA = 0.05
DLN_CFG = Config(
    data=DataConfig(n=512, in_dim=4, out_dim=3, noise="gaussian", noise_scale=SIGMA),
    teacher=TeacherConfig(kind="dln", widths=(3, 3), rank=2, generator="rand_rank"),
    model=ModelConfig(widths=(3, 3), target_params=None, activation="identity", bias=False),
    train=TrainConfig(optimizer="adam", learning_rate=1e-2, steps=1500, grad_tol=1e-4),
    run=RunConfig(seed=0),
)


@pytest.fixture(scope="module")
def dln_target():
    return build_target(DLN_CFG)


def test_erm_recovers_dln_teacher_map(dln_target):
    t = dln_target
    assert t.widths == (4, 3, 3, 3) and t.d == 4 * 3 + 3 * 3 + 3 * 3 and t.w_star.shape == (t.d,)
    assert t.teacher_rank == 2 and t.generator == "rand_rank"
    student = np.asarray(end_to_end_matrix(t.unravel(t.w_star)), np.float64)
    teacher = np.asarray(end_to_end_matrix(t.teacher_params), np.float64)
    # Least-squares error of a 4x3 map from 512 samples at σ = 0.05 is ~σ/√n ≈ 2e-3 per entry.
    assert np.abs(student - teacher).max() < 0.02, (student, teacher)
    # w* fits the data at least as well as the teacher (the teacher is a feasible student here).
    w_teacher = flatten(t.teacher_params)[0]
    loss_star = float(jnp.mean(t.per_sample_loss(t.w_star, t.x, t.y)))
    loss_teacher = float(jnp.mean(t.per_sample_loss(w_teacher, t.x, t.y)))
    assert loss_star <= loss_teacher + 1e-3
    assert t.train_report.final_loss == pytest.approx(loss_star, rel=1e-5)
    # Gaussian NLL per output is ½ r²/σ², so at the teacher the mean loss is ≈ out_dim/2.
    assert loss_teacher == pytest.approx(1.5, rel=0.1)


def test_per_sample_loss_is_the_gaussian_nll(dln_target):
    t = dln_target
    pred = t.apply_fn(t.unravel(t.w_star), t.x)
    want = 0.5 * jnp.sum((t.y - pred) ** 2, -1) / SIGMA**2
    got = t.per_sample_loss(t.w_star, t.x, t.y)
    assert got.shape == (512,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # y − teacher(x) is the noise: variance σ² per coordinate.
    resid = np.asarray(t.y - t.x @ end_to_end_matrix(t.teacher_params), np.float64)
    assert abs(resid.var() / SIGMA**2 - 1) < 5 * np.sqrt(2 / resid.size)


def test_truth_for_dln_student(dln_target):
    truth = pytest.importorskip("llc_bench.truth")
    assert dln_target.truth == pytest.approx(truth.dln_learning_coefficient((4, 3, 3, 3), 2))


def test_same_seed_bit_identical_other_seed_different(dln_target):
    again = build_target(DLN_CFG)
    for name in ("x", "y", "w_star"):
        np.testing.assert_array_equal(getattr(again, name), getattr(dln_target, name))
    assert again.train_report == dln_target.train_report
    other = build_target(dataclasses.replace(DLN_CFG, run=RunConfig(seed=1)))
    for name in ("x", "y", "w_star"):
        assert not np.allclose(getattr(other, name), getattr(dln_target, name))


def test_use_teacher(dln_target):
    cfg = dataclasses.replace(DLN_CFG, train=dataclasses.replace(DLN_CFG.train, use_teacher=True))
    t = build_target(cfg)
    np.testing.assert_array_equal(t.w_star, flatten(dln_target.teacher_params)[0])
    np.testing.assert_array_equal(t.y, dln_target.y)  # the data do not depend on training
    assert t.train_report is None and t.teacher_rank == 2
    wrong = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, widths=(3, 4)))
    with pytest.raises(ValueError, match="use_teacher"):
        build_target(wrong)


RELU_CFG = Config(
    data=DataConfig(n=64, in_dim=32, out_dim=1, noise="gaussian", noise_scale=0.1),
    teacher=TeacherConfig(kind="mlp", widths=(16,), activation="relu", bias=True),
    model=ModelConfig(widths=None, target_params=10_000, depth=2, activation="relu", bias=True),
    train=TrainConfig(steps=2),
)


def test_student_sizing_and_mlp_teacher():
    widths = student_widths(RELU_CFG)
    d = count_params(widths, True)
    assert widths[0] == 32 and widths[-1] == 1 and len(widths) == 4 and abs(d - 10_000) <= 500
    params, t_widths, act, bias, rank, generator = build_teacher(RELU_CFG)
    assert t_widths == (32, 16, 1) and (act, bias, rank, generator) == ("relu", True, None, None)
    # Teacher biases are random (not zero) so that ReLU kinks cut through the data.
    b = np.asarray(params["layer_000"]["bias"])
    assert np.abs(b).min() > 0 and 0.5 < b.std() < 1.5


@pytest.mark.slow
def test_sized_relu_target_end_to_end():
    t = build_target(RELU_CFG)
    assert abs(t.d - 10_000) <= 500 and t.d == count_params(t.widths, True)
    assert t.truth is None and t.teacher_rank is None and t.generator is None
    assert t.train_report.steps == 2
    clean = make_apply(t.teacher_widths, "relu", True)(t.teacher_params, t.x)
    assert 0.05 < float(jnp.std(t.y - clean)) < 0.2
