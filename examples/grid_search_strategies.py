"""Pick an ensemble strategy by grid search, with and without a training budget.

``EnsembleAttributor.score`` is the LDS against models retrained on subsets of each
fold's training data, so ``GridSearchCV`` with no ``scoring`` picks the strategy
whose attributions best predict retraining. The retrained ground truth is cached per
fold, so the candidates share it. A second search reports the training time beside
the LDS and refits the best strategy that trains within a budget.

    python examples/grid_search_strategies.py
"""

import pandas as pd
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

search = GridSearchCV(attributor, grid, cv=2).fit(X, y)
columns = [
    "param_ensemble",
    "param_n_models",
    "param_n_masks",
    "param_n_adapters",
    "mean_test_score",
    "mean_fit_time",
    "mean_score_time",
]
table = pd.DataFrame(search.cv_results_)[columns].rename(columns={"mean_test_score": "mean_test_lds"})
print(table.to_string(index=False))
print(f"best strategy by LDS: {search.best_params_} (LDS {search.best_score_:.3f})")

# Budget: half the time the 4-model independent ensemble took to fit.
independent_4 = (table["param_ensemble"] == "independent") & (table["param_n_models"] == 4)
limit = 0.5 * float(table["mean_fit_time"][independent_4].iloc[0])
scoring = {"lds": lds_scorer, "train_seconds": cost_scorer("train_seconds")}
budget = GridSearchCV(attributor, grid, cv=2, scoring=scoring, refit=best_under_budget(limit)).fit(X, y)
results = pd.DataFrame(budget.cv_results_)
print(results[["params", "mean_test_lds", "mean_test_train_seconds"]].to_string(index=False))
print(f"best strategy training within {limit:.1f} s: {budget.best_params_}")
