"""Small torch modules for examples, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """A multilayer perceptron: ``Linear -> ReLU -> Dropout`` per hidden layer, then
    a linear output layer.

    Parameters
    ----------
    n_features : int
        Input dimension.
    n_outputs : int
        Output dimension (classes for a classifier, 1 for a regressor).
    hidden : sequence of int, default=(128,)
        Widths of the hidden layers.
    dropout : float, default=0.1
        Dropout rate after each hidden layer (0 disables dropout).
    """

    def __init__(
        self,
        n_features: int = 64,
        n_outputs: int = 10,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.1,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, X):
        return self.layers(X)
