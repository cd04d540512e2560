"""Optional matplotlib figures (``pip install sktda[plot]``)."""

from __future__ import annotations

import numpy as np

__all__ = ["plot_influential"]


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
