"""Optional matplotlib figures (``pip install sktda[plot]``)."""

from __future__ import annotations

import numpy as np

__all__ = ["plot_influential", "plot_removal_effect"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sktda.plotting needs matplotlib: pip install 'sktda[plot]'.") from exc
    return plt


def plot_influential(
    X_test, X_train, influence, *, y_test=None, y_train=None, image_shape=(8, 8), n_show=None
):
    """One row per test image: the image, then its top proponents and opponents.

    Parameters
    ----------
    X_test, X_train : ndarray
        Flattened images.
    influence : sktda.Influence
        From ``EnsembleAttributor.most_influential``.
    y_test, y_train : ndarray, optional
        Labels shown in the titles.
    image_shape : tuple, default=(8, 8)
    n_show : int, optional
        Test rows to draw (all by default).

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    n = len(X_test) if n_show is None else min(n_show, len(X_test))
    k = influence.proponents.shape[1]
    fig, axes = plt.subplots(n, 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.5 * n), squeeze=False)
    for i in range(n):
        panels = [(X_test[i], "test" + (f" y={y_test[i]}" if y_test is not None else ""), "black")]
        for j, s in zip(influence.proponents[i], influence.proponent_scores[i]):
            panels.append(
                (X_train[j], ("+" if y_train is None else f"y={y_train[j]} ") + f"{s:.2g}", "tab:green")
            )
        for j, s in zip(influence.opponents[i], influence.opponent_scores[i]):
            panels.append(
                (X_train[j], ("-" if y_train is None else f"y={y_train[j]} ") + f"{s:.2g}", "tab:red")
            )
        for ax, (image, title, color) in zip(axes[i], panels):
            ax.imshow(np.asarray(image).reshape(image_shape), cmap="gray_r")
            ax.set_title(title, fontsize=7, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"test digit | top {k} proponents (green) | top {k} opponents (red)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_removal_effect(effect, *, title=None):
    """Two panels from :func:`sktda.model_selection.removal_effect`: the retrained
    change of each test target with its top proponents removed beside random
    removals, and the retrained change against the predicted one.

    Parameters
    ----------
    effect : sklearn.utils.Bunch
        What ``removal_effect`` returns.
    title : str, optional
        The figure's title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    k = effect.removed.shape[1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.boxplot([effect.attributed, effect.random], showfliers=False)
    rng = np.random.RandomState(0)
    for position, values, color in ((1, effect.attributed, "tab:red"), (2, effect.random, "tab:gray")):
        left.scatter(position + rng.uniform(-0.12, 0.12, len(values)), values, s=12, color=color, alpha=0.7)
    left.set_xticks([1, 2], [f"top {k} proponents", f"{k} random"])
    left.axhline(0, color="black", lw=0.8)
    left.set_ylabel("retrained change of the test target")
    left.set_title("removed, then retrained", fontsize=10)

    right.scatter(effect.predicted, effect.attributed, s=14, color="tab:red", label=f"top {k}")
    right.scatter(effect.random_predicted, effect.random, s=14, color="tab:gray", label=f"{k} random")
    both = np.concatenate([effect.predicted, effect.attributed, effect.random_predicted, effect.random])
    lo, hi = float(both.min()), float(both.max())
    right.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--")
    right.set_xlabel("predicted change (calibrated scores)")
    right.set_ylabel("retrained change")
    right.set_title("predicted against retrained", fontsize=10)
    right.legend(fontsize=8)
    if title is not None:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
