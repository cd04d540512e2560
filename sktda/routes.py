"""Gradient routes: how sktda takes each layer's per-sample gradients.

A *route* computes one module's share of the per-sample gradients from its inputs
(a forward hook) and the gradient of the targets with respect to its output (one
backward pass for a whole chunk of samples), without forming the per-sample
gradient when it can project it directly. sktda has routes for ``nn.Linear``,
transformers' ``Conv1D``, ``nn.Conv2d``, ``nn.Embedding``,
``nn.MultiheadAttention`` and the normalisation layers. Parameters that no route
covers are differentiated exactly from the operations that use them, which forms
their per-sample gradients in full: a route for a large layer type of your own
makes it as fast as the built-in ones.

A layer whose weight gradient is a sum of outer products ``sum_t left_t
right_t^T`` (a linear map applied at positions ``t``) needs only
:meth:`WeightRoute.factors`. Subclassing with ``module_type=`` registers the
route; every route is checked against plain autograd on a few samples at each
fit, so a wrong route is never used silently.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from sktda.routes import WeightRoute
>>> class ScaledLinear(nn.Module):
...     def __init__(self, n_in, n_out, scale=2.0):
...         super().__init__()
...         self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
...         self.scale = scale
...     def forward(self, x):
...         return self.scale * x @ self.weight.T
>>> class ScaledLinearRoute(WeightRoute, module_type=ScaledLinear):
...     def factors(self, x, d):  # d: gradient of the targets w.r.t. the output
...         return self.module.scale * d, x
"""

from ._layers import Route, WeightRoute, register_route

__all__ = ["Route", "WeightRoute", "register_route"]
