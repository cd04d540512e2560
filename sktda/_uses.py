"""Per-sample gradients of parameters that no route covers, from the operations
that use them.

During the engine's ordinary forward pass a ``TorchFunctionMode`` watches every
torch operation. Tensors computed from the chunk's inputs are *batched* (one row
block per sample); tensors computed from watched parameters and constants alone
are *derived* (a positional table sliced as ``pos.weight[None, :T]``, a tied
weight transposed), and remember how to rebuild themselves from the parameters.
An operation where a derived tensor meets a batched one is a *use*: its output's
gradient (taken with the routes' in the same backward pass) is per sample, and
the parameters' per-sample gradients are the vector-Jacobian products of that one
operation, row block by row block, under ``vmap``. Only that operation is
vmapped, never the model, so data-dependent control flow elsewhere (padding-mask
checks in transformers) does not matter.

A tensor expanded to the chunk's samples has the same row for each. A constant
expanded so (BART's positions, ``arange(T).expand(n, -1)``) is batched from there
on. A derived one (``cls_token.expand(n, -1, -1)``: ViT's class token,
distillation and register tokens, a prompt-tuning soft prompt, before they are
concatenated with the inputs) is a use: a sample's gradient of the parameter is
the sum over its broadcast positions of that sample's row's gradient.

An operation that does not act row by row (its batched operands' leading size is
not a multiple of the chunk's) cannot be split this way: :class:`NotPerSample` is
raised, and the engine differentiates those parameters row by row instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

_BATCHED = "_sktda_batched"
_DERIVED = "_sktda_derived"
_ROWS = object()  # the slot of a batched argument in a recorded use


class NotPerSample(RuntimeError):
    """An operation using a watched parameter cannot be split per sample."""


@dataclass
class _Rebuild:
    """How a derived tensor is computed from the parameters: ``func`` on the
    arguments ``leaves`` (derived ones as their own rebuilds); ``index`` picks one
    output of several."""

    func: object
    leaves: list
    spec: object
    index: int | None
    names: frozenset

    def __call__(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        args, kwargs = tree_unflatten([_rebuilt(t, params) for t in self.leaves], self.spec)
        out = self.func(*args, **kwargs)
        return out if self.index is None else tree_flatten(out)[0][self.index]


@dataclass
class _Root:
    """A watched parameter itself."""

    name: str

    @property
    def names(self) -> frozenset:
        return frozenset((self.name,))

    def __call__(self, params):
        return params[self.name]


def _rebuilt(leaf, params):
    return leaf(params) if isinstance(leaf, _Rebuild | _Root) else leaf


def _captured(leaves: list) -> list:
    """The arguments with derived tensors replaced by their rebuilds, so that they
    no longer depend on the marks (removed after the pass)."""
    return [
        getattr(t, _DERIVED) if isinstance(t, torch.Tensor) and hasattr(t, _DERIVED) else t for t in leaves
    ]


@dataclass
class Use:
    """One operation where derived tensors meet batched ones: its arguments
    (``_ROWS`` for a batched one, whose tensor is in ``batched``), and the
    outputs whose gradients the engine takes."""

    func: object
    leaves: list
    spec: object
    batched: list[torch.Tensor]
    outputs: list[torch.Tensor]
    names: frozenset


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return name.startswith("__i") or (name.endswith("_") and not name.endswith("__"))


# the operations that broadcast a tensor to a new leading size, every row the same
_EXPANDS = frozenset((torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to))


@dataclass(frozen=True)
class _FirstRow:
    """``func``'s output's first row block: one sample's share of an expansion."""

    func: object

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)[:1]

    @property
    def __name__(self):
        return getattr(self.func, "__name__", "expand")


def _expands_to(func, leaves, out, n: int) -> bool:
    """Whether ``out`` is a tensor broadcast by ``func`` to ``n`` identical rows (a
    new leading dimension of size ``n``, or a leading 1 expanded to it)."""
    if func not in _EXPANDS or n <= 1 or not isinstance(out, torch.Tensor) or out.dim() == 0:
        return False
    source = leaves[0]
    return out.shape[0] == n and (source.dim() < out.dim() or source.shape[0] == 1)


class UseTracer(TorchFunctionMode):
    """Watches ``params`` (``{name: leaf tensor}``) through one forward pass whose
    batched inputs are ``inputs`` (``n`` samples), and collects their :class:`Use`
    operations."""

    def __init__(self, params: dict[str, torch.Tensor], inputs, n: int):
        super().__init__()
        self.params, self.n = params, n
        self.uses: list[Use] = []
        for name, p in params.items():
            setattr(p, _DERIVED, _Root(name))
        for t in tree_flatten(inputs)[0]:
            if isinstance(t, torch.Tensor):
                setattr(t, _BATCHED, True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not tensors:
            return func(*args, **kwargs)
        derived = [getattr(t, _DERIVED) for t in tensors if hasattr(t, _DERIVED)]
        batched = any(getattr(t, _BATCHED, False) for t in tensors)
        if derived and batched and _is_inplace(func):  # keep the operands as they were
            leaves = [_batched_clone(t) if getattr(t, _BATCHED, False) else t for t in leaves]
        out = func(*args, **kwargs)
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        new = [o for o in outputs if not any(o is t for t in tensors)]
        if derived:
            names = frozenset().union(*(d.names for d in derived))
            if batched:
                is_batched = [isinstance(t, torch.Tensor) and getattr(t, _BATCHED, False) for t in leaves]
                self.uses.append(
                    Use(
                        func,
                        [_ROWS if b else t for b, t in zip(is_batched, _captured(leaves))],
                        spec,
                        [t for b, t in zip(is_batched, leaves) if b],
                        [o for o in outputs if o.is_floating_point()],
                        names,
                    )
                )
                _mark(outputs, _BATCHED, True)
            elif _expands_to(func, leaves, out, self.n):
                self.uses.append(Use(_FirstRow(func), _captured(leaves), spec, [], [out], names))
                _mark([out], _BATCHED, True)
            else:
                several = len(outputs) > 1
                rebuild_leaves = _captured(leaves)
                for i, o in enumerate(outputs):
                    if any(o is t for t in new):
                        setattr(
                            o, _DERIVED, _Rebuild(func, rebuild_leaves, spec, i if several else None, names)
                        )
        elif batched or _expands_to(func, leaves, out, self.n):  # a constant expanded to the samples
            _mark(new, _BATCHED, True)
        return out


def use_gradients(use: Use, leaves: dict[str, torch.Tensor], deltas, n: int) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``{name: (n, *shape)}`` of the use's parameters (whose
    values are ``leaves``), given the gradients ``deltas`` of the per-sample targets
    with respect to its outputs (None where an output does not reach them)."""
    params = {name: leaves[name].detach() for name in sorted(use.names)}
    blocks = [_rows(t.detach(), n) for t in use.batched]
    cotangents = [
        _rows(torch.zeros_like(o) if d is None else d, n).detach() for o, d in zip(use.outputs, deltas)
    ]

    def one(rows, ds):
        def f(p):
            rows_left = iter(rows)
            args, kwargs = tree_unflatten(
                [next(rows_left) if t is _ROWS else _rebuilt(t, p) for t in use.leaves], use.spec
            )
            outs = tree_flatten(use.func(*args, **kwargs))[0]
            return tuple(o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())

        outs, pullback = vjp(f, params)
        return pullback(tuple(d.reshape(o.shape) for d, o in zip(ds, outs)))[0]

    try:
        return vmap(one)(blocks, cotangents)
    except NotPerSample:
        raise
    except Exception as exc:  # an operation vmap cannot split
        raise NotPerSample(f"{getattr(use.func, '__name__', use.func)}: {exc}") from exc


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as ``(n, rows per sample, ...)`` row blocks."""
    if t.dim() == 0 or t.shape[0] % n:
        raise NotPerSample(f"a tensor of shape {tuple(t.shape)} is not split by sample into {n} row blocks")
    return t.reshape(n, t.shape[0] // n, *t.shape[1:])


def mark_batched(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as one row block per sample (a call's output expanded per sample)."""
    setattr(t, _BATCHED, True)
    return t


def is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is marked as one row block per sample (:func:`mark_batched`)."""
    return getattr(t, _BATCHED, False)


def _batched_clone(t: torch.Tensor) -> torch.Tensor:
    return mark_batched(t.clone())


def _mark(tensors, attr, value):
    for t in tensors:
        setattr(t, attr, value)


def release(params, inputs) -> None:
    """Remove the marks from tensors that outlive the pass."""
    for p in params.values():
        if hasattr(p, _DERIVED):
            delattr(p, _DERIVED)
    for t in tree_flatten(inputs)[0]:
        if isinstance(t, torch.Tensor) and hasattr(t, _BATCHED):
            delattr(t, _BATCHED)
