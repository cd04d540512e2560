"""The base both estimators share.

``fit`` is one skeleton: validate the parameters, the net and the data, build the
ensemble strategy from the parameters of the same names, train through
:class:`TrainedEnsemble`, record the costs, and hand over to the subclass's
``_fit_features``, which holds its own maths (attribution features and method
states, or outlier detectors). The fit runs apart and replaces the previous one
only once complete. The split follows scikit-learn's ``BaseBagging`` ->
``IsolationForest``.
"""

from __future__ import annotations

import numbers
import time
from abc import ABCMeta, abstractmethod

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from ._cluster import featurize_on_cluster
from ._compat import Interval, StrOptions, fit_context
from ._data import n_samples, take, targets_of, validate_fit_data, validate_predict_data
from ._ensembles import ENSEMBLES, TrainedEnsemble
from ._features import LocalShards, empty_array, shard_ranges
from ._featurize import featurize_members
from ._gradients import GRADIENT_PATHS, GradientConfig, assign_members, feature_dim
from ._nets import (
    check_net,
    check_pretrained,
    frozen_nets,
    given_checkpoints,
    initialized_module,
    is_peft_model,
    resolve_device,
    takes_token_ids,
    working_copy,
)
from ._parallel import active_client
from ._resources import FitPlan
from ._task import NetTask

# One documentation fragment per shared parameter, substituted into both
# estimators' docstrings by :func:`fill_doc` (``%(name)s`` markers).
_PARAMETER_DOCS = {
    "estimator": """estimator : skorch net, FrozenEstimator or list of FrozenEstimator
        Unfitted skorch net (``NeuralNetClassifier``, ``NeuralNetRegressor``,
        ``NeuralNet``...), cloned for every trained model; a fitted net passed
        without ``FrozenEstimator`` is cloned and trained again, as
        scikit-learn does. A ``sklearn.frozen.FrozenEstimator`` around a fitted
        net (or a list of them, your own ensemble) is used as it is: its weights
        are attributed or scored, nothing is trained (but LoRA adapters on top),
        and the net is left unchanged; :func:`sktda.frozen_net` wraps a module
        trained elsewhere. Where the module holds weights already (frozen,
        ``pretrained=True``, a peft model) class labels are its output indices,
        never re-encoded from the classes present in y. ``CrossEntropyLoss``
        (the module returns logits), ``NLLLoss`` (the module returns probabilities
        in a ``NeuralNetClassifier``, log-probabilities in a plain ``NeuralNet``)
        and ``MSELoss`` (one output per sample) have closed forms; any other
        criterion that splits into per-sample losses is evaluated per sample (and
        ``target="auto"`` then attributes the loss). A module that returns a
        transformers ``ModelOutput``, a dict or a tuple is trained and attributed
        on its logits.""",
    "n_models": """n_models : int, default=1
        Independently trained models, each from its own seed (with frozen nets:
        their number, which n_models must leave at 1 or equal).""",
    "checkpoints": """checkpoints : list or None, default=None
        With a frozen ``estimator`` only: the checkpoints of your own training,
        for ``method="tracin"`` and the detector's checkpoints. A list of ``(state,
        learning_rate)`` pairs, ``state`` a ``module.state_dict()`` or the path of
        one saved by ``torch.save`` (skorch's ``Checkpoint`` callback writes its
        ``f_params`` so), or with several frozen nets a list of such lists, one
        per net. sktda records its own when it trains.""",
    "n_masks": """n_masks : int, default=5
        Fixed dropout masks per model (``ensemble="dropout"``).""",
    "dropout_rate": """dropout_rate : float in (0, 1) or None, default=None
        Dropout rate of the masks; None keeps each dropout layer's own rate.""",
    "projection": """projection : {"gaussian", "rademacher"}, default="gaussian"
        Distribution of the random projection's entries.""",
    "gradient_path": """gradient_path : {"auto", "layers", "vmap"}, default="auto"
        How per-sample gradients are computed. ``"auto"`` (or ``"layers"``): one
        forward and backward pass per chunk, each layer's share taken by its route
        from its inputs and output gradients (``nn.Linear``, transformers'
        ``Conv1D``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.MultiheadAttention`` and
        normalisation layers, see :mod:`sktda.routes`), projected without forming
        the per-sample gradient when the member has more than ``proj_dim``
        parameters, exact otherwise; parameters without a route are differentiated
        from the operations that use them. ``"vmap"``: ``torch.func.vmap(grad)``
        over the whole model and a dense projection of the whole gradient.""",
    "pretrained": """pretrained : bool, default=False
        The net's ``module`` is an instance holding pretrained weights, and the
        ensemble fine-tunes them: independent members fine-tune them fully, each
        with its own seed and data order; dropout members come from one
        fine-tune; LoRA members are adapters trained on the frozen pretrained
        module, with no base training (``n_models x n_adapters`` adapters on that
        one base), each with its own copy of the output layer trained in full (a
        new classification head must learn). With False, a module class is
        trained from scratch (a module instance is still trained from its current
        weights, and LoRA bases are trained first).""",
    "batch_size": """batch_size : int, default=256
        Samples per chunk of per-sample gradients (bounds memory, not results).""",
    "device": """device : str or torch.device, default="auto"
        Torch device for training and gradients; "auto" is CUDA when available.
        A device that cannot run a computation is refused in ``fit``.""",
    "n_jobs": """n_jobs : int or None, default=None
        Models trained and featurized in parallel through
        ``sklearn.utils.parallel.Parallel`` (so joblib's Dask or Ray backends
        apply). Results are bitwise the same whatever its value: torch's threads
        are shared among the models (training) and the members (featurizing) as
        they would be in parallel, also when they run one after another.""",
    "random_state": """random_state : int, RandomState instance or None, default=None
        Seeds training, dropout masks, adapters, projections and detectors.""",
    "verbose": """verbose : int, default=0
        Progress bars for training and featurization when > 0.""",
    "estimators_": """estimators_ : list of skorch nets
        The trained models.""",
    "ensemble_": """ensemble_ : TrainedEnsemble
        The trained models and the strategy that turns them into members: what
        the gradient engine differentiates.""",
    "n_features_in_": """n_features_in_ : int
        Number of features seen in ``fit``.""",
    "feature_names_in_": """feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Feature names seen in ``fit``, when X had string column names.""",
    "classes_": """classes_ : ndarray of shape (n_classes,)
        Class labels (classifiers only).""",
}


def fill_doc(cls):
    """Substitute the shared parameter fragments into ``cls.__doc__``."""
    doc = cls.__doc__
    for name, text in _PARAMETER_DOCS.items():
        doc = doc.replace(f"%({name})s", text)
    cls.__doc__ = doc
    return cls


class GradientEstimator(BaseEstimator, metaclass=ABCMeta):
    """Base of the estimators that train an ensemble of a skorch net and work on
    its per-sample gradients. Subclasses provide ``_fit_features`` and may extend
    ``_check_fit``, ``_check_targets``, ``_check_resources``, ``_n_checkpoints`` and ``_discard``."""

    _parameter_constraints: dict = {
        "estimator": "no_validation",  # check_net gives a clearer error than a constraint
        "n_models": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_masks": [Interval(numbers.Integral, 1, None, closed="left")],
        "dropout_rate": [Interval(numbers.Real, 0, 1, closed="neither"), None],
        "layers": [None, str, list],
        "proj_dim": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "projection": [StrOptions({"gaussian", "rademacher"})],
        "gradient_path": [StrOptions(set(GRADIENT_PATHS))],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "n_jobs": [numbers.Integral, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "pretrained": ["boolean"],
        "checkpoints": [list, None],
    }

    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Train the ensemble and fit on the training set's gradient features.

        Parameters
        ----------
        X : array-like, torch.Tensor, dict of them, dask array or torch Dataset
            Training inputs, ``(n_samples, ...)``: anything the skorch net accepts
            (tables, N-d arrays such as images, integer token ids, dicts passed to
            ``forward`` by keyword, a map-style ``Dataset`` of ``(x, y)`` items),
            or a dask array. A dask array or a ``Dataset`` is kept by reference,
            not copied (do not change the data behind it); its rows are read where
            they are featurized (on the workers, on a Dask cluster).
        y : array-like or torch.Tensor of shape (n_samples,) or (n_samples, T)
            Training targets: class labels for classifiers, values for regressors,
            next-token ids for a language model. Required, except with a
            ``Dataset``, whose targets are read from it (its ``targets`` or ``y``
            attribute, else its items) when y is None.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        # A fit is atomic: it runs on a copy without the previous fit's state, and its
        # state replaces the previous one only once it is complete. On an error or an
        # interrupt the previous fit stays as it was, files included.
        previous = vars(self).get("_fit_names", ())
        fitted = self._unfitted()
        given = set(vars(fitted))  # the parameters, and scikit-learn's configuration
        try:
            fitted._fit(X, y)
        except BaseException:
            fitted._discard()
            raise
        self._discard()
        for name in previous:
            self.__dict__.pop(name, None)
        names = tuple(k for k in vars(fitted) if k not in given)
        self.__dict__.update({k: vars(fitted)[k] for k in names})
        self._fit_names = names
        return self

    def _unfitted(self):
        """A copy holding the parameters and scikit-learn's configuration, without
        any fit's state: where a fit, or a plan of one, sets its attributes."""
        fit_state = (*vars(self).get("_fit_names", ()), "_fit_names")
        copy = object.__new__(type(self))
        copy.__dict__.update({k: v for k, v in vars(self).items() if k not in fit_state})
        return copy

    def _prepare(self, X, y):
        """What a fit on ``(X, y)`` checks and builds before any training: the task,
        the initialised module (a frozen net's own, copied), the validated data and
        the ensemble strategy."""
        y = targets_of(X, y)  # a Dataset's, read once
        nets = self._frozen_nets()
        task = check_net(self.estimator if nets is None else nets[0], self._target(), y)
        if nets is None:
            check_pretrained(self.estimator, self.pretrained)
            module = initialized_module(self.estimator)
            if self.checkpoints is not None:
                raise ValueError(
                    "checkpoints are the training checkpoints of a model you trained yourself, given with "
                    "a FrozenEstimator; sktda records its own along the training it runs. Pass "
                    "FrozenEstimator(fitted_net) as estimator, or checkpoints=None."
                )
        else:
            module = working_copy(nets[0].module_)
            if self.n_models not in (1, len(nets)):
                raise ValueError(
                    f"n_models={self.n_models}, and the ensemble is the {len(nets)} frozen net(s) given: "
                    "nothing is trained. Leave n_models=1, or pass that many FrozenEstimators in a list."
                )
        self._check_fit(task)
        holds_weights = nets is not None or self.pretrained or is_peft_model(module)
        X, y = validate_fit_data(
            self, X, y, task, takes_token_ids(module), module=module if holds_weights else None
        )
        self._check_targets(task, y)
        self._task = task
        # the strategy's parameters are the estimator's of the same names
        strategy = ENSEMBLES[self.ensemble].from_params(self.get_params(deep=False))
        strategy.check(module, take(X, slice(0, 1)))
        return task, module, X, y, strategy

    def _fit(self, X, y):
        task, module, X, y, strategy = self._prepare(X, y)
        device = resolve_device(self.device)
        self._fit_plan = self._check_resources(X, task, module, strategy, device)
        del module  # a copy, for the checks: not held while the members train and featurize

        start = time.perf_counter()
        nets = self._frozen_nets()
        if nets is None:
            self.ensemble_ = TrainedEnsemble.fit(
                strategy,
                self.estimator,
                X,
                y,
                task=task,
                n_models=self.n_models,
                random_state=self.random_state,
                device=device,
                n_jobs=self.n_jobs,
                verbose=self.verbose,
                n_checkpoints=self._n_checkpoints(),
            )
        else:  # the user's models, as they are: nothing trained but LoRA adapters
            self.ensemble_ = TrainedEnsemble.adopt(
                strategy,
                nets,
                X,
                y,
                random_state=self.random_state,
                device=device,
                checkpoints=given_checkpoints(self.checkpoints, nets),
            )
        self.estimators_ = self.ensemble_.nets
        train_seconds = time.perf_counter() - start
        self.costs_ = {"train_seconds": train_seconds, **self._fit_features(X, y, task=task, device=device)}

    def _frozen_nets(self) -> list | None:
        """The user's fitted nets (``estimator`` a ``FrozenEstimator`` or a list of
        them), or None when sktda trains the ensemble."""
        return frozen_nets(self.estimator)

    def _n_models(self) -> int:
        """The models of the ensemble: ``n_models`` trained, or the frozen nets."""
        nets = self._frozen_nets()
        return self.n_models if nets is None else len(nets)

    # ------------------------------------------------------------------ hooks
    def _target(self):
        """The attributed target (``target`` parameter); the loss's own by default."""
        return "auto"

    def _check_fit(self, task: NetTask) -> None:
        """Refuse parameter combinations that cannot work, before any training."""

    def _check_targets(self, task: NetTask, y) -> None:
        """Refuse, before any training, what the validated targets ``y`` show cannot work."""

    def _check_resources(self, X, task: NetTask, module: torch.nn.Module, strategy, device) -> FitPlan:
        """Refuse a fit whose results cannot be stored, before any training
        (``module``: the initialised, untrained module; ``strategy``: the
        ensemble's), and return the decisions the fit acts on."""
        return FitPlan()

    def _discard(self) -> None:
        """Release what this fit holds outside the estimator (files)."""

    def _n_checkpoints(self) -> int | None:
        """Checkpoints to record along training (None: the final model only)."""
        return None

    @abstractmethod
    def _fit_features(self, X, y, *, task: NetTask, device: torch.device) -> dict:
        """Fit on the trained ensemble's gradient features; return extra costs."""

    # ---------------------------------------------------------------- helpers
    def _prepare_predict(self, X, y):
        """Validated ``(task, X, y, device)``; ``y=None`` becomes the ensemble's
        predicted labels."""
        check_is_fitted(self)
        task = self._task
        X, y = validate_predict_data(self, X, y, task)
        device = resolve_device(self.device)
        if y is None:
            n_classes = len(self.classes_) if hasattr(self, "classes_") else None
            y = self.ensemble_.predict_labels(X, task, self.batch_size, device, n_classes)
        return task, X, y, device

    def _per_layer(self) -> bool:
        """Whether each layer keeps its own block of features."""
        return False

    def _gradient_config(self, task, device, dtype=np.float32) -> GradientConfig:
        return GradientConfig(
            task=task,
            proj_dim=self.proj_dim,
            projection=self.projection,
            path=self.gradient_path,
            batch_size=self._chunk_rows(),
            device=device,
            dtype=dtype,
            per_layer=self._per_layer(),
        )

    def _chunk_rows(self) -> int:
        """The rows featurized at once: as the fit's memory plan decided, else
        ``batch_size``."""
        plan = vars(self).get("_fit_plan")
        return (plan.chunk_rows if plan is not None else None) or self.batch_size

    def _client(self):
        """The Dask client whose workers keep the training features: joblib's active
        Dask backend's, or None."""
        return active_client()

    def _training_features(
        self, members, X, y, *, task, device, dtype=np.float32, out_file=None, local=False
    ):
        """Every member's training features, in shards: ``(shards, residuals
        (n_members, n), layouts, factor sums)``, one layout and factor sum per
        member. On a Dask cluster (:meth:`_client`) they stay on its workers
        (:class:`~sktda._cluster.ClusterShards`); otherwise they are computed
        through joblib and held here (:class:`~sktda._features.LocalShards`), in
        memory or memory-mapped from ``out_file``, and always with ``local``."""
        client = None if local else self._client()
        if client is not None:
            config = self._gradient_config(task, torch.device("cpu"), dtype)
            width = len(members) * feature_dim(members[0], config)
            return featurize_on_cluster(
                client,
                members,
                X,
                y,
                config=config,
                assignments=self._assignments(members, X, y, config),
                ranges=shard_ranges(n_samples(X), width * np.dtype(dtype).itemsize, self.batch_size),
                threads=max(1, torch.get_num_threads() // len(members)),
            )
        features = self._featurize(members, X, y, task=task, device=device, dtype=dtype, out_file=out_file)
        if out_file is not None:
            phi = np.load(out_file, mmap_mode="r+")
        elif len(features) == 1:  # a single member's features are kept as they are: no copy
            phi = features[0].phi[None]
        else:
            phi = np.stack(
                [f.phi for f in features], out=empty_array((len(features), *features[0].phi.shape), dtype)
            )
        residuals = np.stack([f.residual for f in features])
        ranges = shard_ranges(phi.shape[1], phi.shape[0] * phi.shape[2] * phi.itemsize, self.batch_size)
        return (
            LocalShards(phi, residuals, ranges),
            residuals,
            [f.layout for f in features],
            [f.factors for f in features],
        )

    def _assignments(self, members, X, y, config) -> list:
        """How each member's parameters are differentiated: checked once, on the
        first training samples, by the fit (whose state keeps it), and reused by
        every later featurization, so that a query pays no route check."""
        if "_route_assignments" not in vars(self):
            self._route_assignments = assign_members(members, X, y, config)
        return self._route_assignments

    def _featurize(self, members, X, y, *, task, device, dtype=np.float32, out_file=None):
        config = self._gradient_config(task, device, dtype)
        return featurize_members(
            members,
            X,
            y,
            config=config,
            assignments=self._assignments(members, X, y, config),
            n_jobs=self.n_jobs,
            verbose=self.verbose,
            out_file=out_file,
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.allow_nan = False
        return tags
