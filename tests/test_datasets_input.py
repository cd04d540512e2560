"""Training sets given as a torch Dataset (map-style, its targets inside, as skorch
takes them): kept by reference, read where they are used, with the results of the
same data given as numpy arrays. Dask arrays: tests/test_distributed.py."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch.utils.data import Dataset, Subset, TensorDataset

from sktda import EnsembleAttributor, OutlierGradientDetector

from .conftest import make_classifier_net


class Rows(Dataset):
    """Reads row ``i`` on demand; no ``targets`` attribute, so sktda reads its items."""

    def __init__(self, X, y, log=None):
        self.X, self.labels, self.log = X, y, log

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        if self.log is not None:
            self.log.append(i)
        return torch.from_numpy(self.X[i]), int(self.labels[i])


@pytest.fixture(scope="module")
def numpy_fit(digits):
    X_train, _, y_train, _ = digits
    attr = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=32, batch_size=16, random_state=0)
    return attr.fit(X_train, y_train)


def test_a_dataset_gives_the_results_of_its_arrays_and_is_never_copied(numpy_fit, digits):
    X_train, X_test, y_train, y_test = digits
    expected = numpy_fit.attribute(X_test, y_test)
    read = []
    dataset = Rows(X_train, y_train, read)
    attr = clone(numpy_fit).fit(dataset)
    assert attr.retraining_.X is dataset and attr.plan_memory(dataset).inputs == 0  # a reference
    assert set(read) == set(range(len(X_train)))  # its targets, read from its items
    np.testing.assert_array_equal(attr.classes_, numpy_fit.classes_)
    np.testing.assert_array_equal(attr.attribute(X_test, y_test), expected)
    # a test Dataset: its own targets are attributed
    np.testing.assert_array_equal(attr.attribute(Rows(X_test, y_test)), expected)
    tensors = TensorDataset(torch.from_numpy(X_train), torch.from_numpy(y_train))
    np.testing.assert_array_equal(clone(numpy_fit).fit(tensors).attribute(X_test, y_test), expected)
    for got, want in zip(
        attr.most_influential(X_test, y_test, k=3), numpy_fit.most_influential(X_test, y_test, k=3)
    ):
        np.testing.assert_array_equal(got, want)


def test_score_retrains_on_subsets_of_the_dataset(numpy_fit, digits):
    X_train, X_test, y_train, y_test = digits
    attr = clone(numpy_fit).set_params(score_n_subsets=3)
    on_arrays = clone(attr).fit(X_train, y_train).score(X_test, y_test)
    assert clone(attr).fit(Rows(X_train, y_train)).score(X_test, y_test) == on_arrays


def test_a_dataset_whose_items_or_classes_skorch_cannot_train_on_is_refused(digits):
    X_train, _, y_train, _ = digits
    attr = EnsembleAttributor(make_classifier_net(max_epochs=1), proj_dim=16)

    class Inputs(Dataset):
        def __len__(self):
            return len(X_train)

        def __getitem__(self, i):
            return torch.from_numpy(X_train[i])

    with pytest.raises(ValueError, match=r"not an \(input, target\) pair"):
        attr.fit(Inputs())
    with pytest.raises(ValueError, match="class indices 0..n_classes-1"):
        attr.fit(Rows(X_train, y_train + 1))
    assert not hasattr(attr, "ensemble_")


def test_the_detector_filters_a_dataset_into_a_subset(digits):
    X_train, _, y_train, _ = digits
    detector = OutlierGradientDetector(make_classifier_net(), contamination=0.1, random_state=0)
    X_kept, y_kept = clone(detector).fit_resample(X_train, y_train)
    subset, targets = clone(detector).fit_resample(Rows(X_train, y_train))
    assert isinstance(subset, Subset)
    np.testing.assert_array_equal(np.stack([subset[i][0].numpy() for i in range(len(subset))]), X_kept)
    np.testing.assert_array_equal(targets, y_kept)
