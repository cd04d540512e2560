"""plan_memory: what a fit will hold, stage by stage, asked before any training.
Its agreement with measured peaks is shown by the scaling benchmark."""

import numpy as np
import pytest
from sklearn.base import clone

from sktda import EnsembleAttributor

from .conftest import make_classifier_net


def test_the_plan_sizes_what_the_fit_holds(digits, tmp_path):
    X_train, _, y_train, _ = digits
    n = len(X_train)
    attr = EnsembleAttributor(make_classifier_net(), method="trak", n_models=2, proj_dim=64, random_state=0)
    plan = attr.plan_memory(X_train, y_train, n_test=20)
    assert not hasattr(attr, "n_features_in_")  # planning fits nothing
    attr.fit(X_train, y_train)
    assert plan.features == attr.costs_["feature_bytes"] == 2 * n * (64 * 4 + 4)
    assert plan.features_on_disk == 0
    assert plan.inputs == n * 64 * 4  # sktda's float32 copy, kept for score
    assert plan.models == 2 * sum(p.numel() * 4 for p in attr.estimators_[0].module_.parameters())
    assert plan.curvature == 2 * 8 * 2 * 64 * 64  # per member: the Gram, then its inverse
    assert plan.scores == 16 * 20 * n
    assert plan.training > plan.models / 2 and plan.featurizing > 0
    assert plan.peak >= plan.fit_peak >= plan.features + plan.inputs + plan.models
    assert "features on disk" in str(plan) and "MiB" in str(plan)

    on_disk = clone(attr).set_params(features_dir=str(tmp_path)).plan_memory(X_train, y_train)
    # residuals stay in memory; "auto" stores features on disk in float16
    assert (on_disk.features, on_disk.features_on_disk) == (2 * n * 4, 2 * n * 64 * 2)
    wide = clone(attr).set_params(features_dir=str(tmp_path), feature_dtype="float32")
    assert wide.plan_memory(X_train, y_train).features_on_disk == 2 * n * 64 * 4
    assert list(tmp_path.iterdir()) == []
    half = clone(attr).set_params(feature_dtype="float16").plan_memory(X_train, y_train)
    assert half.features == 2 * n * (64 * 2 + 4)


def test_the_plan_follows_the_method_and_the_ensemble(digits):
    X_train, _, y_train, _ = digits
    n = len(X_train)
    base = EnsembleAttributor(make_classifier_net(), proj_dim=64)
    # TracIn: a member per checkpoint; no inverse
    tracin = clone(base).set_params(method="tracin", n_checkpoints=2).plan_memory(X_train, y_train)
    assert tracin.features == 2 * n * (64 * 4 + 4) and tracin.curvature == 0
    # EK-FAC: two 8 x 8 blocks (hidden and output layers), each with two eigenbases and its eigenvalues
    ekfac = clone(base).set_params(method="ekfac").plan_memory(X_train, y_train)
    assert ekfac.features == n * (128 * 4 + 4) and ekfac.curvature == 8 * 2 * (64 + 64 + 64)
    # dropout members share their model's parameters
    dropout = clone(base).set_params(ensemble="dropout", n_masks=3).plan_memory(X_train, y_train)
    assert dropout.features == 3 * n * (64 * 4 + 4)


def test_a_bad_plan_is_refused_as_a_fit_would_be(digits):
    X_train, _, y_train, _ = digits
    with pytest.raises(ValueError, match="proj_dim"):
        EnsembleAttributor(make_classifier_net(), proj_dim=0).plan_memory(X_train, y_train)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        EnsembleAttributor(make_classifier_net()).plan_memory(X_train, y_train[:-1])
    # a valid input gets a plan whose every stage is a whole, non-negative number of bytes
    plan = EnsembleAttributor(make_classifier_net()).plan_memory(X_train, y_train)
    assert all(isinstance(v, int) and v >= 0 for v in plan)
    assert min(plan.models, plan.training, plan.featurizing, plan.features) > 0
    assert plan.peak >= plan.fit_peak >= plan.training and plan.fit_peak >= plan.models + plan.features


def test_available_memory_counts_the_reclaimable_page_cache():
    """MemAvailable, not MemFree: a machine whose memory sits in the page cache
    still has it to give."""
    import os

    from sktda._resources import available_memory

    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo: not Linux")
    with open("/proc/meminfo") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    if "MemAvailable" not in fields:
        pytest.skip("a kernel without MemAvailable")
    # both read the same moment only approximately: within 1% of the total
    assert abs(available_memory() - fields["MemAvailable"]) < 0.01 * fields["MemTotal"]


def test_the_plan_counts_samples_of_a_dict_input():
    """A dict of inputs has as many samples as its arrays have rows, not keys."""
    import torch
    from skorch import NeuralNetClassifier

    from sktda.models import TokenTransformer

    rng = np.random.default_rng(0)
    X = {"input_ids": rng.integers(0, 13, (30, 6)), "attention_mask": np.ones((30, 6), dtype=np.int64)}
    y = rng.integers(0, 3, 30)
    net = NeuralNetClassifier(
        TokenTransformer,
        module__vocab_size=13,
        module__n_outputs=3,
        module__d_model=8,
        module__n_heads=2,
        module__max_len=6,
        criterion=torch.nn.CrossEntropyLoss,
        max_epochs=1,
        train_split=None,
        verbose=0,
    )
    attr = EnsembleAttributor(net, proj_dim=32, random_state=0)
    plan = attr.plan_memory(X, y)
    assert plan.features == attr.fit(X, y).costs_["feature_bytes"] == 30 * (32 * 4 + 4)
    assert plan.inputs == 2 * 30 * 6 * 8


def _memory_of(monkeypatch, available):
    import sktda._resources as features_module

    monkeypatch.setattr(features_module, "available_memory", lambda: available)


def test_a_fit_that_would_not_fit_featurizes_fewer_rows_at_once(digits, monkeypatch):
    X_train, X_test, y_train, y_test = digits
    from sklearn.frozen import FrozenEstimator

    # a trained net with wide activations: nothing to train, and featurizing dominates
    net = make_classifier_net(module__hidden=(512, 512)).fit(X_train, y_train)
    attr = EnsembleAttributor(FrozenEstimator(net), proj_dim=16, batch_size=128, random_state=0)
    full = attr.plan_memory(X_train, y_train)
    assert full.chunk_rows == 128 and "chunk rows" in str(full)
    assert full.fit_peak == full.models + full.features + full.featurizing + full.inputs
    # room for the rest of the fit and the model's copy and about 40 rows
    row = (full.featurizing - full.models) // 128
    available = full.fit_peak - full.featurizing + full.models + 40 * row
    _memory_of(monkeypatch, available)
    plan = attr.plan_memory(X_train, y_train)
    assert 30 <= plan.chunk_rows <= 40 and plan.fit_peak <= available
    shrunk = clone(attr).fit(X_train, y_train)
    assert shrunk._fit_plan.chunk_rows == plan.chunk_rows
    monkeypatch.undo()
    expected = clone(attr).fit(X_train, y_train).attribute(X_test, y_test)
    np.testing.assert_allclose(shrunk.attribute(X_test, y_test), expected, rtol=1e-4, atol=1e-6)


def test_a_fit_that_cannot_fit_is_refused_before_any_training(digits, monkeypatch):
    from skorch import NeuralNet

    X_train, _, y_train, _ = digits
    attr = EnsembleAttributor(make_classifier_net(module__hidden=(512, 512)), proj_dim=64, random_state=0)
    plan = attr.plan_memory(X_train, y_train)
    # room for everything the fit keeps, features in memory included, but not to train the model
    resident = plan.models + plan.inputs + plan.features + plan.curvature + plan.working
    assert plan.fit_peak > resident + 1
    _memory_of(monkeypatch, resident + 1)
    monkeypatch.setattr(NeuralNet, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=r"at its peak .*training .* plan_memory"):
        attr.fit(X_train, y_train)
