"""Faults that would lose a user's work: full disks, Ctrl+C, and refits that fail
part-way. A fit is atomic: on any error or interrupt the previous fit stays whole
and usable, its features file included, and nothing new is left on disk."""

import collections
import contextlib
import errno
import os
import signal

import numpy as np
import pytest
from skorch.callbacks import Callback, EarlyStopping

import sktda._ensembles as ensembles
import sktda._featurize as featurizing
import sktda._resources as features_module
from sktda import EnsembleAttributor, FilteredEstimator, OutlierGradientDetector
from sktda._scoring import DetectorRule

from .conftest import make_classifier_net

_Usage = collections.namedtuple("_Usage", "total used free")


class _CtrlC(Callback):
    """Sends this process a SIGINT at the end of training's second epoch."""

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == 2:
            signal.raise_signal(signal.SIGINT)


def _attributor(**kwargs):
    return EnsembleAttributor(make_classifier_net(max_epochs=2), proj_dim=16, random_state=0, **kwargs)


def _assert_intact(attr, before, X_test, y_test, files):
    """``attr`` still is the fit that gave ``before``, with its features file."""
    ensemble, A = before
    assert attr.ensemble_ is ensemble
    np.testing.assert_array_equal(attr.attribute(X_test, y_test), A)
    assert sorted(files()) == sorted([attr.train_features_.filename])


@pytest.mark.parametrize("where", ["features_dir", "temporary directory"])
def test_a_disk_without_room_is_refused_before_training(digits, tmp_path, monkeypatch, where):
    X_train, _, y_train, _ = digits
    monkeypatch.setattr(ensembles, "fit_net", lambda *a, **k: pytest.fail("trained before the check"))
    monkeypatch.setattr(features_module.shutil, "disk_usage", lambda path: _Usage(10**9, 10**9 - 1000, 1000))
    if where == "features_dir":
        attr = _attributor(features_dir=str(tmp_path))
    else:  # features larger than half the memory go to the temporary directory
        monkeypatch.setattr(features_module, "available_memory", lambda: 1000)
        monkeypatch.setattr(features_module.tempfile, "tempdir", str(tmp_path))
        attr = _attributor()
    # 150 samples x 16 features, one member: float16 on disk ("auto")
    needed = 150 * 16 * 2
    with pytest.raises(
        ValueError, match=rf"need 0 MiB \({needed} bytes\) in '{tmp_path}', and its disk has 0 MiB"
    ):
        attr.fit(X_train, y_train)
    assert not hasattr(attr, "ensemble_") and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EDQUOT])
def test_a_disk_that_fills_during_the_fit(digits, tmp_path, monkeypatch, failure):
    """The features file is reserved block by block before it is written (a sparse
    memory map would crash the process with SIGBUS once the disk is full)."""
    X_train, X_test, y_train, y_test = digits
    attr = _attributor(features_dir=str(tmp_path)).fit(X_train, y_train)
    before = attr.ensemble_, attr.attribute(X_test, y_test)

    def full(fd, offset, length):
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(features_module.os, "posix_fallocate", full)
    with pytest.raises(ValueError, match=rf"The training features need .* bytes\) in '{tmp_path}'"):
        attr.set_params(random_state=1).fit(X_train, y_train)
    _assert_intact(attr, before, X_test, y_test, lambda: [str(p) for p in tmp_path.iterdir()])


def test_features_are_written_where_the_file_system_has_no_fallocate(digits, tmp_path, monkeypatch):
    X_train, X_test, y_train, y_test = digits
    expected = _attributor().fit(X_train, y_train).attribute(X_test, y_test)

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(features_module.os, "posix_fallocate", unsupported)
    attr = _attributor(features_dir=str(tmp_path), feature_dtype="float32").fit(X_train, y_train)
    (stored,) = tmp_path.iterdir()
    assert os.path.getsize(stored) >= attr.train_features_.nbytes
    np.testing.assert_allclose(attr.attribute(X_test, y_test), expected, rtol=1e-5)


def test_ctrl_c_during_training_stops_the_fit(digits, tmp_path):
    """skorch swallows KeyboardInterrupt; sktda raises it again, and the previous
    fit is kept."""
    X_train, X_test, y_train, y_test = digits
    installed = signal.getsignal(signal.SIGINT)  # Python's, or what an earlier test left
    attr = _attributor(features_dir=str(tmp_path)).fit(X_train, y_train)
    before = attr.ensemble_, attr.attribute(X_test, y_test)
    attr.set_params(estimator=make_classifier_net(max_epochs=3, callbacks=[_CtrlC()]))
    with signal_handler(signal.default_int_handler):
        with pytest.raises(KeyboardInterrupt, match="training was interrupted"):
            attr.fit(X_train, y_train)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is installed
    _assert_intact(attr, before, X_test, y_test, lambda: [str(p) for p in tmp_path.iterdir()])
    detector = OutlierGradientDetector(make_classifier_net(max_epochs=3, callbacks=[_CtrlC()]))
    with signal_handler(signal.default_int_handler), pytest.raises(KeyboardInterrupt):
        detector.fit(X_train, y_train)
    assert not hasattr(detector, "ensemble_")


def test_ctrl_c_stops_the_fit_under_a_handler_of_the_caller_s_own(digits):
    """A cluster, a framework or the caller may have installed its own SIGINT
    handler (one that does not raise): it is called, Ctrl+C still stops the fit,
    and the handler is back afterwards. Whatever an earlier test left installed,
    the outcome is the same."""
    X_train, _, y_train, _ = digits
    calls = []

    def own(signum, frame):
        calls.append(signum)

    attr = EnsembleAttributor(make_classifier_net(max_epochs=3, callbacks=[_CtrlC()]), proj_dim=16)
    with signal_handler(own):
        with pytest.raises(KeyboardInterrupt, match="training was interrupted"):
            attr.fit(X_train, y_train)
        assert signal.getsignal(signal.SIGINT) is own
    assert calls == [signal.SIGINT] and not hasattr(attr, "ensemble_")


@contextlib.contextmanager
def signal_handler(handler):
    """``handler`` as the SIGINT handler within, the one before restored after."""
    before = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_early_stopping_still_ends_training_normally(digits):
    """skorch's EarlyStopping ends training by raising KeyboardInterrupt itself."""
    X_train, X_test, y_train, y_test = digits
    stop = EarlyStopping(monitor="train_loss", patience=1, threshold=100.0)  # no epoch improves enough
    attr = EnsembleAttributor(make_classifier_net(max_epochs=10, callbacks=[stop]), proj_dim=16)
    attr.fit(X_train, y_train)
    assert len(attr.estimators_[0].history) == 2
    assert np.isfinite(attr.attribute(X_test, y_test)).all()


@pytest.mark.parametrize("interrupt", [RuntimeError("lost the GPU"), KeyboardInterrupt()])
def test_a_refit_that_fails_while_featurizing_keeps_the_previous_fit(
    digits, tmp_path, monkeypatch, interrupt
):
    X_train, X_test, y_train, y_test = digits
    attr = _attributor(features_dir=str(tmp_path), n_models=2).fit(X_train, y_train)
    before = attr.ensemble_, attr.attribute(X_test, y_test)

    def fail(*args, **kwargs):
        raise interrupt

    monkeypatch.setattr(featurizing, "featurize_rows", fail)
    with pytest.raises(type(interrupt)):
        attr.set_params(random_state=1).fit(X_train, y_train)
    monkeypatch.undo()
    _assert_intact(attr, before, X_test, y_test, lambda: [str(p) for p in tmp_path.iterdir()])


def test_a_detector_refit_that_fails_keeps_the_previous_fit(digits, monkeypatch):
    X_train, X_test, y_train, _ = digits
    detector = OutlierGradientDetector(make_classifier_net(max_epochs=2), random_state=0).fit(
        X_train, y_train
    )
    state = detector.ensemble_, detector.detectors_, detector.offset_, detector.decision_function(X_test)

    def fail(self, G, seed):
        raise KeyboardInterrupt

    monkeypatch.setattr(DetectorRule, "_fitted", fail)
    with pytest.raises(KeyboardInterrupt):
        detector.set_params(random_state=1).fit(X_train, y_train)
    assert detector.ensemble_ is state[0] and detector.detectors_ is state[1] and detector.offset_ == state[2]
    np.testing.assert_array_equal(detector.decision_function(X_test), state[3])


def test_a_filtered_refit_that_fails_keeps_the_previous_fit(digits):
    """The detector's refit succeeds, the estimator's fails: neither is replaced."""
    from sklearn.linear_model import LogisticRegression

    X_train, X_test, y_train, _ = digits
    detector = OutlierGradientDetector(make_classifier_net(max_epochs=2), random_state=0)
    model = FilteredEstimator(LogisticRegression(max_iter=200), detector).fit(X_train, y_train)
    fitted = model.detector_, model.estimator_
    with pytest.raises(ValueError, match="'C' parameter"):
        model.set_params(estimator=LogisticRegression(C=-1.0)).fit(X_train, y_train)
    assert (model.detector_, model.estimator_) == fitted
    assert model.predict(X_test).shape == (len(X_test),)
