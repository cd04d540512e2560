"""
Pick an ensemble strategy by grid search, with and without a training budget
==============================================================================

:meth:`EnsembleAttributor.score <sktda.EnsembleAttributor.score>` is the LDS
against models retrained on subsets of each fold's training data, so
``GridSearchCV`` with no ``scoring`` picks the strategy whose attributions best
predict retraining. The retrained ground truth is cached per fold, so the
candidates share it. A second search reports the training time beside the LDS
and refits the best strategy that trains within a budget; a figure shows the
candidates' LDS against their training time::

    python examples/plot_grid_search_strategies.py
"""

import torch
from sklearn.model_selection import GridSearchCV
from skorch import NeuralNetClassifier

from sktda import EnsembleAttributor
from sktda.datasets import load_digits_split
from sktda.model_selection import best_under_budget, cost_scorer, lds_scorer
from sktda.models import MLP

X, _, y, _ = load_digits_split(n_train=800, n_test=100, random_state=0)
net = NeuralNetClassifier(
    MLP,
    module__n_features=64,
    module__n_outputs=10,
    criterion=torch.nn.CrossEntropyLoss,
    optimizer=torch.optim.SGD,
    optimizer__momentum=0.9,
    lr=0.05,
    max_epochs=30,
    batch_size=64,
    train_split=None,
    verbose=0,
)
attributor = EnsembleAttributor(net, method="trak", score_n_subsets=30, random_state=0)
grid = [
    {"ensemble": ["independent"], "n_models": [1, 4]},
    {"ensemble": ["dropout"], "n_models": [1], "n_masks": [4]},
    {"ensemble": ["lora"], "n_models": [1], "n_adapters": [4]},
]


def describe(params):
    sizes = [str(params.get(k)) for k in ("n_models", "n_masks", "n_adapters") if k in params]
    return f"{params['ensemble']} {'x'.join(sizes)}"


# %%
# Best LDS
# --------
search = GridSearchCV(attributor, grid, cv=2).fit(X, y)
res = search.cv_results_
print(f"{'strategy':<16} {'LDS':>6} {'fit s':>7} {'score s':>8}")
for i, params in enumerate(res["params"]):
    print(
        f"{describe(params):<16} {res['mean_test_score'][i]:>6.3f} {res['mean_fit_time'][i]:>7.1f} "
        f"{res['mean_score_time'][i]:>8.1f}"
    )
print(f"best strategy by LDS: {describe(search.best_params_)} (LDS {search.best_score_:.3f})")

# %%
# Best LDS within a budget
# ------------------------
# The budget is half the time the 4-model independent ensemble took to fit.
# ``cost_scorer`` reports a cost from ``costs_`` beside the LDS, and
# ``best_under_budget`` refits the best candidate whose mean cost fits.
independent_4 = next(
    i for i, p in enumerate(res["params"]) if p == {"ensemble": "independent", "n_models": 4}
)
limit = 0.5 * res["mean_fit_time"][independent_4]
scoring = {"lds": lds_scorer, "train_seconds": cost_scorer("train_seconds")}
budget = GridSearchCV(attributor, grid, cv=2, scoring=scoring, refit=best_under_budget(limit)).fit(X, y)
res = budget.cv_results_
print(f"\n{'strategy':<16} {'LDS':>6} {'train s':>8}")
for i, params in enumerate(res["params"]):
    print(f"{describe(params):<16} {res['mean_test_lds'][i]:>6.3f} {res['mean_test_train_seconds'][i]:>8.2f}")
print(f"best strategy training within {limit:.1f} s: {describe(budget.best_params_)}")

# %%
# LDS against training time; the dashed line is the budget.
try:
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: no figure (pip install -e '.[plot]').")
else:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, params in enumerate(res["params"]):
        x, lds = res["mean_test_train_seconds"][i], res["mean_test_lds"][i]
        ax.scatter(x, lds, color="tab:blue")
        ax.annotate(describe(params), (x, lds), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axvline(limit, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("training seconds per fit")
    ax.set_ylabel("LDS (2-fold mean)")
    fig.tight_layout()
