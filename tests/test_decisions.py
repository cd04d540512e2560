"""Answers users act on: group attribution, standard errors across members, scores
in the target's units, removal checked by retraining, group detection."""

import numpy as np
import pytest
import sklearn
import torch
from sklearn.utils import check_random_state

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda._nets import check_net, fit_net
from sktda.model_selection import removal_effect, subset_retraining

from .conftest import make_classifier_net, make_regressor_net
from .test_attribution import _damped_inv, _last_layer

SOURCES = np.array(["north", "east", "south", "west", "lab"])


def _groups(n):
    return SOURCES[np.arange(n) % len(SOURCES)]


def _summed(A, groups):
    labels = np.unique(groups)
    return np.stack([A[:, groups == label].sum(1) for label in labels], 1)


@pytest.mark.parametrize("method", ["trak", "if", "grad_cos", "tracin", "ekfac"])
@pytest.mark.parametrize("normalize", ["relatif", None])
def test_group_attribution_is_the_sum_of_the_scores(digits, method, normalize):
    """A group's score is its samples' scores (as ``normalize`` leaves them)
    summed, columns in np.unique order."""
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(
        make_classifier_net(),
        method=method,
        normalize=normalize,
        n_models=2,
        proj_dim=64,
        n_checkpoints=2,
        random_state=0,
    ).fit(X_train, y_train)
    groups = _groups(len(X_train))
    G = attr.attribute(X_test, y_test, groups=groups)
    assert G.shape == (len(X_test), len(SOURCES))
    np.testing.assert_allclose(G, _summed(attr.attribute(X_test, y_test), groups), rtol=1e-9, atol=1e-12)
    if method == "trak":  # the group sums in several passes when working_memory is short
        with sklearn.config_context(working_memory=2 * 8 * attr.train_features_.shape[2] / 2**20):
            np.testing.assert_allclose(attr.attribute(X_test, y_test, groups=groups), G, rtol=1e-12)


def test_group_attribution_of_a_regressor_and_integer_groups(regression_data):
    X_train, X_test, y_train, y_test = regression_data
    attr = EnsembleAttributor(make_regressor_net(), n_models=2, normalize=None, random_state=0)
    attr.fit(X_train, y_train)
    groups = np.arange(len(X_train)) % 3 + 10
    np.testing.assert_allclose(
        attr.attribute(X_test, groups=groups), _summed(attr.attribute(X_test), groups), rtol=1e-9, atol=1e-12
    )


def test_most_influential_groups_rank_the_group_scores(fitted_trak, digits):
    _, X_test, _, y_test = digits
    groups = _groups(fitted_trak.train_features_.shape[1])
    G = fitted_trak.attribute(X_test, y_test, groups=groups)
    top = fitted_trak.most_influential(X_test, y_test, k=2, groups=groups)
    np.testing.assert_array_equal(top.proponents, np.argsort(-G, 1)[:, :2])
    np.testing.assert_array_equal(top.opponents, np.argsort(G, 1)[:, :2])
    np.testing.assert_allclose(top.proponent_scores, np.take_along_axis(G, top.proponents, 1))
    assert top.proponent_std is None
    with pytest.raises(ValueError, match="k"):
        fitted_trak.most_influential(X_test, y_test, k=6, groups=groups)


def test_bad_groups_are_refused(fitted_trak, digits):
    _, X_test, _, y_test = digits
    n = fitted_trak.train_features_.shape[1]
    with pytest.raises(ValueError, match=rf"one label per training sample, shape \({n},\)"):
        fitted_trak.attribute(X_test, y_test, groups=np.zeros(n - 1))
    with pytest.raises(ValueError, match="NaN"):
        fitted_trak.attribute(X_test, y_test, groups=np.full(n, np.nan))
    with pytest.raises(TypeError, match="comparable"):
        fitted_trak.attribute(X_test, y_test, groups=np.array([1, "a"] * (n // 2), dtype=object))
    with pytest.raises(ValueError, match="units"):
        fitted_trak.attribute(X_test, y_test, units="margin")


def _member_estimates(attr, X, y):
    """Each member's estimate of the ensemble's raw scores (its share times the
    number of members), from the stored features, member by member."""
    store, method = attr._store, attr._method()()
    phis, _ = attr._test_features(X, y)
    train = torch.as_tensor(attr.train_features_, dtype=torch.float64)
    residuals = torch.as_tensor(attr.train_residuals_, dtype=torch.float64)
    parts = []
    for f, (coef, state) in enumerate(zip(store.coefs, store.states)):
        state = state.to(torch.device("cpu"), torch.float64) if hasattr(state, "to") else state
        side = method.test_side(state, phis[f])
        parts.append(coef * (side @ method.train_side(state, train[f], residuals[f]).T).numpy())
    if method.scales_by_residual:
        weights = np.asarray(store.coefs)[:, None]
        scale = (weights * residuals.numpy()).sum(0) / weights.sum()
        parts = [p * scale for p in parts]
    per_member = np.reshape(parts, (attr.n_members_, store.sets_per_member, *parts[0].shape)).sum(1)
    return attr.n_members_ * per_member


@pytest.mark.parametrize(
    "params",
    [
        dict(method="trak", n_models=3),
        dict(method="grad_dot", n_models=2, ensemble="dropout", n_masks=2),
        dict(method="tracin", n_models=2, n_checkpoints=3),  # a member's checkpoints are one member
    ],
    ids=["trak", "dropout", "tracin"],
)
def test_standard_errors_across_members_match_brute_force(digits, params):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), proj_dim=64, normalize=None, random_state=0, **params)
    attr.fit(X_train, y_train)
    estimates = _member_estimates(attr, X_test, y_test)
    assert len(estimates) == attr.n_members_
    A, std = attr.attribute(X_test, y_test, return_std=True)
    np.testing.assert_allclose(A, estimates.mean(0), rtol=1e-8, atol=1e-12)
    expected = estimates.std(0, ddof=1) / np.sqrt(attr.n_members_)
    np.testing.assert_allclose(std, expected, rtol=1e-6, atol=1e-12)
    groups = _groups(len(X_train))
    G, group_std = attr.attribute(X_test, y_test, groups=groups, return_std=True)
    by_group = np.stack([_summed(e, groups) for e in estimates])
    np.testing.assert_allclose(G, by_group.mean(0), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(
        group_std, by_group.std(0, ddof=1) / np.sqrt(attr.n_members_), rtol=1e-6, atol=1e-12
    )


def test_trak_standard_errors_match_the_last_layer_formula(digits):
    """Independently of sktda's features: each member's TRAK kernel from exact
    last-layer gradients, times the ensemble-mean residual."""
    X_train, X_test, y_train, y_test = digits
    common = dict(n_models=3, proj_dim=None, layers="last", damping=0.1, normalize=None, random_state=0)
    attr = EnsembleAttributor(make_classifier_net(), method="trak", **common).fit(X_train, y_train)
    kernels, residuals = [], []
    for net in attr.estimators_:
        phi, w = _last_layer(net.module_, X_train, y_train)
        phi_test, _ = _last_layer(net.module_, X_test, y_test)
        kernels.append(phi_test @ _damped_inv(phi.T @ phi, 0.1, len(phi)) @ phi.T)
        residuals.append(w)
    estimates = np.array(kernels) * np.mean(residuals, 0)
    _, std = attr.attribute(X_test, y_test, return_std=True)
    np.testing.assert_allclose(std, estimates.std(0, ddof=1) / np.sqrt(3), rtol=5e-3, atol=1e-5)


def test_most_influential_standard_errors_and_distinguishable(digits):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), n_models=3, proj_dim=64, random_state=0)
    attr.fit(X_train, y_train)
    A, std = attr.attribute(X_test, y_test, return_std=True)
    top = attr.most_influential(X_test, y_test, k=4, return_std=True)
    np.testing.assert_allclose(top.proponent_std, np.take_along_axis(std, top.proponents, 1), rtol=1e-9)
    np.testing.assert_allclose(top.opponent_std, np.take_along_axis(std, top.opponents, 1), rtol=1e-9)
    proponents, opponents = top.distinguishable(z=1.5)
    np.testing.assert_array_equal(proponents, top.proponent_scores > 1.5 * top.proponent_std)
    np.testing.assert_array_equal(opponents, top.opponent_scores < -1.5 * top.opponent_std)
    screened = np.concatenate([proponents, opponents])
    assert screened.any() and not screened.all()  # the screen separates some scores from zero
    with pytest.raises(ValueError, match="return_std=True"):
        attr.most_influential(X_test, y_test, k=2).distinguishable()


def test_one_member_has_no_standard_error(fitted_trak, digits):
    X_train, X_test, y_train, y_test = digits
    one = EnsembleAttributor(make_classifier_net(), n_models=1, proj_dim=64, random_state=0).fit(
        X_train, y_train
    )
    with pytest.raises(ValueError, match="at least 2 ensemble members"):
        one.attribute(X_test, y_test, return_std=True)


def test_calibrated_units_are_the_least_squares_fit_on_the_subset_models(digits):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(
        make_classifier_net(), n_models=2, proj_dim=64, score_n_subsets=8, random_state=0
    )
    attr.fit(X_train, y_train)
    with pytest.raises(ValueError, match="calibrate_units"):
        attr.attribute(X_test, y_test, units="target")
    assert attr.calibrate_units(X_test, y_test) is attr
    truth = subset_retraining(
        attr.estimator, X_train, y_train, X_test, y_test, n_subsets=8, random_state=0
    )  # score's retraining, which calibrate_units reuses
    R = attr.attribute(X_test, y_test)
    x = (truth.subsets - truth.subsets.mean(0)) @ R.T
    y = truth.outputs - truth.outputs.mean(0)
    slope = float(np.linalg.lstsq(x.reshape(-1, 1), y.ravel(), rcond=None)[0][0])
    np.testing.assert_allclose(attr.units_scale_, slope, rtol=1e-8)
    np.testing.assert_allclose(attr.units_correlation_, np.corrcoef(x.ravel(), y.ravel())[0, 1], atol=0.02)
    np.testing.assert_allclose(attr.attribute(X_test, y_test, units="target"), slope * R, rtol=1e-8)
    G = attr.attribute(X_test, y_test, groups=_groups(len(X_train)), units="target")
    np.testing.assert_allclose(G, slope * _summed(R, _groups(len(X_train))), rtol=1e-8)
    attr.fit(X_train, y_train)  # a refit forgets the calibration
    assert not hasattr(attr, "units_scale_")


def _margins(estimator, X, y, mask, seed, X_test, y_test):
    """Brute force: the net retrained on ``mask`` with ``seed``, and its
    correct-class margins on the test samples, by hand."""
    task = check_net(estimator, "auto", y)
    net = fit_net(estimator, X[mask], y[mask], seed=int(seed), device=torch.device("cpu"), task=task)
    with torch.no_grad():
        logits = net.module_(torch.as_tensor(X_test)).double()
    picked = logits[np.arange(len(y_test)), y_test]
    others = logits.masked_fill(
        torch.nn.functional.one_hot(torch.as_tensor(y_test), logits.shape[1]).bool(), -np.inf
    )
    return (picked - torch.logsumexp(others, 1)).numpy()


def test_removal_effect_matches_brute_force_retraining(digits):
    X_train, X_test, y_train, y_test = digits
    X_test, y_test = X_test[:4], y_test[:4]
    net = make_classifier_net(max_epochs=20)  # trained to classify these test samples correctly
    attr = EnsembleAttributor(net, n_models=2, proj_dim=64, score_n_subsets=6, random_state=0)
    attr.fit(X_train, y_train).calibrate_units(X_test, y_test)
    effect = removal_effect(attr, X_test, y_test, k=3, n_retrains=2, flip_sizes=[3, 75], random_state=7)
    rng = check_random_state(7)
    seeds = rng.randint(0, 2**31 - 1, size=2)
    top = attr.most_influential(X_test, y_test, k=75).proponents
    np.testing.assert_array_equal(effect.removed, top[:, :3])
    assert all(len(set(row)) == 3 for row in effect.random_removed)
    np.testing.assert_array_equal(
        effect.random_removed, [rng.choice(len(X_train), 3, replace=False) for _ in y_test]
    )
    everything = np.ones(len(X_train), dtype=bool)
    full = np.mean(
        [_margins(attr.estimator, X_train, y_train, everything, s, X_test, y_test) for s in seeds], 0
    )
    np.testing.assert_allclose(effect.baseline, full, rtol=1e-5, atol=1e-5)

    def retrained(i, removed):
        mask = everything.copy()
        mask[removed] = False
        return np.mean(
            [_margins(attr.estimator, X_train, y_train, mask, s, X_test, y_test)[i] for s in seeds]
        )

    for i in range(len(y_test)):
        np.testing.assert_allclose(
            effect.attributed[i], retrained(i, top[i, :3]) - full[i], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            effect.random[i], retrained(i, effect.random_removed[i]) - full[i], rtol=1e-5, atol=1e-5
        )
        flips = [size for size in (3, 75) if retrained(i, top[i, :size]) < 0]
        expected = np.nan if full[i] <= 0 else (flips[0] if flips else np.inf)
        np.testing.assert_equal(effect.brittleness[i], expected)
    raw = attr.attribute(X_test, y_test, units="target")
    np.testing.assert_allclose(effect.predicted, -np.take_along_axis(raw, top[:, :3], 1).sum(1), rtol=1e-9)
    assert effect.units_scale == attr.units_scale_
    assert not np.isnan(effect.brittleness).all()
    assert np.isfinite(effect.brittleness).any()  # removing 75 proponents flips some


def test_removal_effect_of_groups(digits):
    X_train, X_test, y_train, y_test = digits
    X_test, y_test = X_test[:3], y_test[:3]
    attr = EnsembleAttributor(
        make_classifier_net(), n_models=2, proj_dim=64, score_n_subsets=6, random_state=0
    )
    attr.fit(X_train, y_train)
    groups = _groups(len(X_train))
    effect = removal_effect(attr, X_test, y_test, k=1, groups=groups, n_retrains=1, flip_sizes=None)
    G = attr.attribute(X_test, y_test, groups=groups)
    np.testing.assert_array_equal(effect.removed[:, 0], G.argmax(1))
    assert effect.brittleness is None and effect.flip_sizes == ()
    # the predicted change is in the units calibrated on the same subset models
    attr.calibrate_units(X_test, y_test)
    np.testing.assert_allclose(effect.units_scale, attr.units_scale_)
    np.testing.assert_allclose(effect.predicted, -attr.units_scale_ * G.max(1), rtol=1e-9)
    rising = removal_effect(attr, X_test, y_test, k=1, groups=groups, remove="opponents", n_retrains=1)
    np.testing.assert_array_equal(rising.removed[:, 0], G.argmin(1))
    assert rising.brittleness is None  # flips are of removed proponents
    with pytest.raises(ValueError, match="every one of the 5"):
        removal_effect(attr, X_test, y_test, k=5, groups=groups)
    with pytest.raises(ValueError, match="flip_sizes"):
        removal_effect(attr, X_test, y_test, k=1, flip_sizes=[0, 3])
    with pytest.raises(ValueError, match="needs the test targets"):
        removal_effect(attr, X_test, None)


def test_removal_effect_of_a_regressor_has_no_brittleness(regression_data):
    X_train, X_test, y_train, y_test = regression_data
    attr = EnsembleAttributor(make_regressor_net(), n_models=2, score_n_subsets=5, random_state=0)
    attr.fit(X_train, y_train)
    effect = removal_effect(attr, X_test[:3], y_test[:3], k=2, n_retrains=1)
    assert effect.brittleness is None and effect.attributed.shape == (3,)


def test_score_groups_is_the_mean_score_per_group(digits):
    X_train, _, y_train, _ = digits
    det = OutlierGradientDetector(make_classifier_net(), random_state=0).fit(X_train, y_train)
    groups = _groups(len(X_train))
    scores = det.score_groups(X_train, y_train, groups)
    expected = [det.score_samples(X_train, y_train)[groups == g].mean() for g in np.unique(groups)]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="one label per sample of X"):
        det.score_groups(X_train, y_train, groups[:-1])


def test_plot_removal_effect(digits):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from sktda.plotting import plot_removal_effect

    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(
        make_classifier_net(), n_models=2, proj_dim=64, score_n_subsets=5, random_state=0
    )
    effect = removal_effect(
        attr.fit(X_train, y_train), X_test[:3], y_test[:3], k=2, n_retrains=1, flip_sizes=None
    )
    fig = plot_removal_effect(effect, title="digits")
    left, right = fig.axes
    assert len(right.collections) == 2 and left.get_ylabel() == "retrained change of the test target"
