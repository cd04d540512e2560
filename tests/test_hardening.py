"""Bad input and faults on the features added since the earlier fault tables
(groups, standard errors, units, ``removal_effect``, ``Dataset`` and dask inputs,
samplers, criteria, routes on layers that subclass a routed type): each case gives
a correct, finite result or a ``ValueError``/``TypeError`` from sktda that names the
problem and the fix, before any training where the input already shows it."""

import copy
import pickle

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor
from torch import nn

import sktda._ensembles as ensembles
from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda.model_selection import Retraining, removal_effect

from .conftest import make_classifier_net


@pytest.fixture
def no_training(monkeypatch):
    """Make any training fail the test: what is refused must be refused before."""
    monkeypatch.setattr(ensembles, "fit_net", lambda *a, **k: pytest.fail("trained before the check"))


@pytest.mark.parametrize("missing", [np.nan, None])
def test_groups_of_object_dtype_with_missing_labels_are_refused(fitted_trak, digits, missing):
    """A float column cast to object (as pandas gives it) keeps NaN as objects:
    each NaN was its own group."""
    X_train, X_test, y_train, y_test = digits
    groups = np.array(["a", "b", "c"] * (len(X_train) // 3), dtype=object)
    groups[4] = missing
    for call in (
        lambda: fitted_trak.attribute(X_test, y_test, groups=groups),
        lambda: fitted_trak.most_influential(X_test, y_test, k=1, groups=groups),
    ):
        with pytest.raises(ValueError, match="no label .* index 4.*fillna"):
            call()
    detector = OutlierGradientDetector(make_classifier_net(max_epochs=1), n_checkpoints=None).fit(
        X_train, y_train
    )
    with pytest.raises(ValueError, match="no label"):
        detector.score_groups(X_train, y_train, groups)


def test_standard_errors_stay_nonnegative_under_a_negative_units_factor(digits):
    """An under-trained ensemble can calibrate to a negative factor: the scores
    flip sign, their standard errors do not."""
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(max_epochs=1), n_models=2, proj_dim=16, random_state=0)
    attr.fit(X_train, y_train)
    scores, std = attr.attribute(X_test, y_test, return_std=True)
    attr.units_scale_ = -0.48  # as calibrate_units sets it
    target, target_std = attr.attribute(X_test, y_test, units="target", return_std=True)
    np.testing.assert_allclose(target, -0.48 * scores)
    np.testing.assert_allclose(target_std, 0.48 * std)
    assert (target_std >= 0).all()


def test_removal_effect_sizes_are_whole_numbers_checked_before_any_retraining(
    fitted_trak, digits, monkeypatch
):
    _, X_test, _, y_test = digits
    monkeypatch.setattr(Retraining, "subsets", lambda *a, **k: pytest.fail("retrained before the check"))
    with pytest.raises(TypeError, match="flip_sizes"):
        removal_effect(fitted_trak, X_test, y_test, k=2, flip_sizes=[2.5])
    with pytest.raises(TypeError, match="flip_sizes"):
        removal_effect(fitted_trak, X_test, y_test, k=2, flip_sizes=["4"])
    with pytest.raises(ValueError, match="flip_sizes is empty"):
        removal_effect(fitted_trak, X_test, y_test, k=2, flip_sizes=[])
    n = fitted_trak.train_features_.shape[1]
    with pytest.raises(ValueError, match=f"every one of the {n}"):
        removal_effect(fitted_trak, X_test, y_test, k=n + 5)


def test_pickling_and_copying_leave_the_live_estimator_as_it_was(digits, tmp_path):
    """scikit-learn's __getstate__ returns the estimator's own __dict__ on Python
    3.11: editing it edited the live estimator (which lost its features file)."""
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(max_epochs=1), proj_dim=16, features_dir=str(tmp_path))
    attr.fit(X_train, y_train)
    before = dict(attr.__dict__)
    A = attr.attribute(X_test, y_test)
    copied = pickle.loads(pickle.dumps(attr))
    copy.deepcopy(attr)
    assert attr.__dict__.keys() == before.keys()
    assert all(attr.__dict__[k] is v for k, v in before.items())
    assert attr._file is not None and len(list(tmp_path.glob("*.npy"))) == 1
    np.testing.assert_array_equal(copied.attribute(X_test, y_test), A)
    np.testing.assert_array_equal(attr.attribute(X_test, y_test), A)


class NaNInEval(nn.Module):
    """Trains normally; in eval mode its outputs are NaN (an eval-mode statistic
    never set)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, X):
        out = self.lin(X)
        return out if self.training else out * torch.tensor(float("nan"))


@pytest.mark.parametrize("estimator", [EnsembleAttributor, OutlierGradientDetector])
def test_a_module_whose_outputs_are_nan_in_eval_mode_is_named(digits, estimator):
    X_train, _, y_train, _ = digits
    net = NeuralNetClassifier(
        NaNInEval, criterion=nn.CrossEntropyLoss, max_epochs=1, lr=0.01, train_split=None, verbose=0
    )
    with pytest.raises(ValueError, match="not finite .* in eval mode"):
        estimator(net).fit(X_train, y_train)


class Ragged(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.zeros(3 + i % 2), i % 2


class FloatTargets(torch.utils.data.Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return torch.as_tensor(self.X[i]), float(self.y[i])


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter((torch.zeros(64), 0) for _ in range(10))


class SizedStream(Stream):
    def __len__(self):
        return 10


def test_datasets_that_cannot_be_read_by_rows_are_refused_before_training(digits, no_training):
    X_train, _, y_train, _ = digits
    with pytest.raises(ValueError, match="cannot be stacked into one batch.*pad them"):
        EnsembleAttributor(make_classifier_net()).fit(Ragged())
    for stream in (Stream(), SizedStream()):
        with pytest.raises(TypeError, match="IterableDataset.*__getitem__ and __len__"):
            EnsembleAttributor(make_classifier_net()).fit(stream)
    with pytest.raises(ValueError, match="Item 0 of the Dataset has a float64 target .* int64 targets"):
        EnsembleAttributor(make_classifier_net()).fit(FloatTargets(X_train, y_train))


def test_a_dask_array_of_unknown_chunk_sizes_is_named(digits, no_training):
    da = pytest.importorskip("dask.array")
    X_train, _, y_train, _ = digits
    X = da.from_array(X_train, chunks=50)
    filtered = X[X[:, 0] >= 0]  # a boolean filter: unknown chunk sizes
    with pytest.raises(ValueError, match="unknown chunk sizes.*compute_chunk_sizes"):
        EnsembleAttributor(make_classifier_net()).fit(filtered, y_train)


@pytest.mark.parametrize("n_test, error", [("10", TypeError), (2.5, TypeError), (-5, ValueError)])
def test_plan_memory_refuses_a_count_that_is_not_one(digits, n_test, error):
    X_train, _, y_train, _ = digits
    with pytest.raises(error, match="n_test"):
        EnsembleAttributor(make_classifier_net()).plan_memory(X_train, y_train, n_test=n_test)


def test_a_sampling_strategy_callable_returning_nothing_is_refused_before_training(digits, no_training):
    X_train, _, y_train, _ = digits
    detector = OutlierGradientDetector(make_classifier_net(), sampling_strategy=lambda y: None)
    with pytest.raises(TypeError, match="returned NoneType .* list of labels of y or a dict"):
        detector.fit(X_train, y_train)


def test_a_sampling_strategy_callable_may_return_imblearn_s_dict(digits):
    X_train, _, y_train, _ = digits
    detector = OutlierGradientDetector(
        make_classifier_net(max_epochs=1), n_checkpoints=None, sampling_strategy=lambda y: {0: 5, 1: 5}
    ).fit(X_train, y_train)
    assert set(detector.sampling_strategy_) == {0, 1}


def test_a_huber_loss_of_tiny_delta_is_per_sample(regression_data):
    """The coupling check compares directions: gradients of 1e-20 have one too."""
    X_train, X_test, y_train, y_test = regression_data
    net = NeuralNetRegressor(
        nn.Linear,
        module__in_features=X_train.shape[1],
        module__out_features=1,
        criterion=nn.HuberLoss,
        criterion__delta=1e-20,
        max_epochs=1,
        train_split=None,
        verbose=0,
    )
    A = EnsembleAttributor(net, method="grad_dot").fit(X_train, y_train).attribute(X_test, y_test)
    assert np.isfinite(A).all()
