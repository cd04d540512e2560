import numpy as np
import pytest

from sktda.metrics import linear_datamodeling_score, units_calibration


def _linear_world(n_test=4, n_train=30, n_subsets=40, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n_test, n_train))
    S = rng.random((n_subsets, n_train)) < 0.5
    return A, S, S @ A.T


def test_exact_linear_datamodel_scores_one_and_its_negation_minus_one():
    A, S, Y = _linear_world()
    assert linear_datamodeling_score(A, S, Y) == pytest.approx(1.0)
    assert linear_datamodeling_score(-A, S, Y) == pytest.approx(-1.0)


def test_invariant_to_positive_rescaling_per_test_sample_and_monotone_outputs():
    A, S, Y = _linear_world()
    scale = np.array([0.1, 1.0, 7.0, 300.0])[:, None]
    assert linear_datamodeling_score(A * scale, S, np.exp(Y)) == pytest.approx(1.0)


def test_noise_lowers_the_score_and_per_sample_scores():
    A, S, Y = _linear_world()
    rng = np.random.default_rng(1)
    noisy = A + rng.normal(scale=2.0, size=A.shape)
    per_sample = linear_datamodeling_score(noisy, S, Y, average=False)
    assert per_sample.shape == (4,)
    assert np.all(per_sample < 0.999)
    assert linear_datamodeling_score(noisy, S, Y) == pytest.approx(per_sample.mean())


def test_constant_outputs_are_ignored_in_the_mean():
    A, S, Y = _linear_world()
    Y[:, 0] = 3.0
    per_sample = linear_datamodeling_score(A, S, Y, average=False)
    assert np.isnan(per_sample[0])
    assert linear_datamodeling_score(A, S, Y) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((4, 30), (40, 29), (40, 4)), "cover 29"),
        (((4, 30), (40, 30), (40, 5)), "outputs must have shape"),
        (((4, 30), (2, 30), (2, 4)), "at least 3 subsets"),
        (((30,), (40, 30), (40, 4)), "2-D"),
    ],
)
def test_bad_shapes(shapes, match):
    a, s, y = (np.ones(shape) for shape in shapes)
    with pytest.raises(ValueError, match=match):
        linear_datamodeling_score(a, s.astype(bool), y)


def test_non_finite_input():
    A, S, Y = _linear_world()
    A[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        linear_datamodeling_score(A, S, Y)


def test_units_calibration_recovers_the_scale_and_refuses_zero_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 30))
    subsets = rng.random((200, 30)) < 0.5
    outputs = 3.0 * (subsets @ scores.T) + 7.0  # an offset per test sample is centred away
    scale, correlation = units_calibration(scores, subsets, outputs)
    assert scale == pytest.approx(3.0) and correlation == pytest.approx(1.0)
    noisy = outputs + rng.normal(scale=5.0, size=outputs.shape)
    scale, correlation = units_calibration(scores, subsets, noisy)
    assert 2.5 < scale < 3.5 and 0.3 < correlation < 0.99
    # scores of the opposite sign: a negative factor, a negative correlation
    assert units_calibration(-scores, subsets, outputs)[0] == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="no difference"):
        units_calibration(np.zeros_like(scores), subsets, outputs)
