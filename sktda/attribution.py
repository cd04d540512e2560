"""EnsembleAttributor: training data attribution with cheap ensembles."""

from __future__ import annotations

import numbers
import os
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, check_scalar

from ._base import GradientEstimator, fill_doc
from ._compat import Interval, StrOptions
from ._data import (
    copy_inputs,
    group_codes,
    n_samples,
    take,
    to_torch,
    validate_predict_data,
)
from ._features import FeatureFile, FeatureStore, merge_topk, relatif_scale
from ._gradients import feature_blocks
from ._methods import METHODS, SCORE_DTYPE
from ._nets import checkpoint_epochs, checkpoints_per_net, resolve_device
from ._resources import (
    FitPlan,
    FitSizes,
    MemoryPlan,
    check_dense_fits,
    check_fit_resources,
    check_writable_directory,
    copied_bytes,
    dense_fits,
    input_bytes,
    memory_plan,
    resident_sizes,
    row_bytes,
)
from ._task import TARGETS
from .metrics import linear_datamodeling_score, units_calibration
from .model_selection import Retraining

__all__ = ["EnsembleAttributor", "Influence"]


class Influence(NamedTuple):
    """Top-k training samples (or groups) per test sample: indices into the
    training set (or into ``np.unique(groups)``) and their scores, proponents by
    decreasing score, opponents by increasing score; with ``return_std=True``,
    the scores' standard errors across ensemble members (None otherwise)."""

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray
    proponent_std: np.ndarray | None = None
    opponent_std: np.ndarray | None = None

    def distinguishable(self, z: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
        """Which proponents and opponents are distinguishable from zero: their
        score is more than ``z`` standard errors across members away from it (the
        default, 2, is about a 95% two-sided normal interval; the members are few,
        so treat it as a screen, not a test).

        Returns
        -------
        proponents, opponents : ndarray of bool, each of shape (n_test, k)
        """
        if self.proponent_std is None:
            raise ValueError(
                "distinguishable needs the standard errors: call most_influential(..., return_std=True)."
            )
        return (
            self.proponent_scores > z * self.proponent_std,
            self.opponent_scores < -z * self.opponent_std,
        )


@fill_doc
class EnsembleAttributor(ClassNamePrefixFeaturesOutMixin, TransformerMixin, GradientEstimator):
    """Training data attribution averaged over an ensemble of skorch nets.

    ``fit`` trains the ensemble members and caches projected per-sample gradient
    features of the training set; ``attribute`` scores how much every training
    sample drove each test prediction, averaged over the members. Ensembling is what
    makes gradient-based attribution reliable on non-convex models.

    Parameters
    ----------
    %(estimator)s
    method : {"auto", "trak", "if", "tracin", "grad_dot", "grad_cos", "kfac", "ekfac"}, \
            default="auto"
        Scoring rule. ``"trak"``: TRAK (Park et al., 2023); ``"if"``: influence
        function with a damped empirical-Fisher inverse in projected gradient
        space; ``"tracin"``: TracIn over ``n_checkpoints`` checkpoints weighted by
        the learning rate; ``"grad_dot"`` / ``"grad_cos"``: inner product / cosine
        of test-target and training-loss gradients; ``"kfac"`` / ``"ekfac"``:
        TRAK's attribution with per-layer curvature, each layer's projected
        Gauss-Newton matrix approximated by Kronecker factors (K-FAC) or by their
        eigenbasis with exact eigenvalues (EK-FAC), each layer damped on its own.
        ``"auto"``: EK-FAC for a language model's sequence log-likelihood (where
        it attributes better than TRAK), TRAK otherwise (where it attributes
        better than EK-FAC on images). See "Choosing a method" in the user guide.
    ensemble : {"independent", "dropout", "lora"}, default="independent"
        How members are made (Deng et al., 2024). ``"independent"``: ``n_models``
        nets trained from different seeds; ``"dropout"``: each trained model
        yields ``n_masks`` members, one fixed dropout mask each; ``"lora"``: each
        trained model is the base of ``n_adapters`` LoRA adapters, and gradients
        are taken with respect to the adapters only (and the output layer, which
        LoRA members of a pretrained module train too). ``n_models > 1`` with
        ``"dropout"`` or ``"lora"`` gives the hybrids.
    %(n_models)s
    %(n_masks)s
    n_adapters : int, default=5
        LoRA adapters per model (``ensemble="lora"``).
    %(dropout_rate)s
    mask_gradients : bool, default=True
        With ``ensemble="dropout"``: True takes gradients under every mask; False
        takes them from the unmasked model and lets the masks enter only through
        ``-dL/df`` (TRAK's ``1 - p``), averaged over masks, which costs one
        backward pass per model instead of one per mask.
    lora_rank : int, default=8
        Rank of the LoRA adapters, at most the smallest dimension of every
        adapted layer. Higher ranks attribute better, at more adapter bytes: on
        held-out fine-tuning splits, LoRA 1x10 went from about 92% of 10 full
        fine-tunes' LDS at rank 4 to 94% at 8 and 96% at 16 (EK-FAC; see
        "Ensembles" in the user guide).
    lora_target_modules : list of str or None, default=None
        Modules that get adapters; None means every ``nn.Linear`` but the output.
    lora_epochs : int, default=5
        Fine-tuning epochs per adapter.
    n_checkpoints : int, default=5
        Checkpoints per model for ``method="tracin"``, evenly spread over the
        epochs, the last included (the net needs ``max_epochs >= 1``).
    %(checkpoints)s
    proj_dim : int or None, default=2048
        Dimension of the random projection of the gradients. When a member has at
        most ``proj_dim`` differentiated parameters (or with None), the exact
        gradient is used. With ``"kfac"`` and ``"ekfac"``, every layer keeps its
        own block of features, each projected as TRAK projects that layer
        (``k_out x k_in = proj_dim``, capped by the layer's sizes), so the
        features are about ``n_layers x proj_dim`` wide.
    %(projection)s
    %(gradient_path)s
    %(pretrained)s
    damping : float or "auto", default="auto"
        Damping ``lambda`` of the inverses, relative to a mean eigenvalue of the
        matrix inverted, so that one value suits any gradient scale, any
        ``proj_dim`` and any training-set size. TRAK and the influence function:
        the mean nonzero eigenvalue of the Gram, ``trace / min(n_train,
        proj_dim)``. K-FAC and EK-FAC: each layer's block on its own, the mean of
        all its eigenvalues, ``trace / width`` (a block's K-FAC or EK-FAC
        eigenvalues fill the whole block, however few the training rows).
        ``"auto"``: 1.0 for TRAK and the influence function (at or near the best
        LDS for both on an MLP and a CNN on images and a transformer language
        model, 0.25 to 8 tried), 0.01 for K-FAC and EK-FAC (within 0.01 of the
        best LDS on three transformer language models and a CNN, with 1 and 5
        models, 0.003 to 1 tried; an MLP prefers 0.1, and loses up to 0.022 at
        0.01). 0 (no damping) warns: the matrix is then singular whenever
        ``proj_dim`` exceeds what the training gradients span.
    target : {"auto", "log_prob", "loss", "sequence_log_likelihood"} or callable, default="auto"
        The scalar attributed per test sample. ``"auto"``: the correct-class
        margin (classifiers), the output (regressors), or the sequence
        log-likelihood (a plain ``NeuralNet`` with a classification loss and
        2-D integer y). ``"log_prob"``: the log-probability of the label;
        ``"loss"``: minus the loss; ``"sequence_log_likelihood"``: for a
        ``NeuralNet`` language model with y the next tokens ``(n, T)``, the sum
        over tokens of their log-probabilities, tokens equal to the criterion's
        ``ignore_index`` left out; or a callable ``(module_output, y) -> (n,)``
        tensor. With ``"auto"``, training samples are featurized by the same
        target with TRAK's ``Q = 1 - p`` (or the residual); with any other
        target, training samples are featurized by minus their loss with
        ``Q = I``, so the training side is the training-loss gradient, as TRAK
        does for language models. ``score`` and ``subset_retraining`` measure the
        same target, in eval mode; they cache their retraining only for a
        callable that pickle can find (a module-level function): a lambda or a
        nested function works, and is retrained on every call.
    normalize : {"auto", "relatif"} or None, default="auto"
        ``"relatif"`` divides each training sample's scores by the square root of
        its absolute self-influence (RelatIF, Barshan et al., 2020), so that
        high-loss training samples do not rank first for every test sample; None
        keeps the raw scores. ``self_attribute`` stays un-normalised. ``"auto"``:
        RelatIF, but raw scores for a language model's sequence log-likelihood.
        RelatIF raised the LDS of TRAK, IF, TracIn and Grad-Dot on every
        classifier measured (the digits MLP on two splits, a CNN on digit images;
        see the documentation's Benchmarks page) and left Grad-Cos unchanged (its
        self-influence is one); on the language models it left TRAK unchanged and
        lowered K-FAC's and EK-FAC's.
    layers : None, "all", "last" or list of str, default=None
        Parameters to differentiate: all (None or "all"), the output layer's
        ("last"), or those of the named modules. LoRA members differentiate their
        adapters, so with ``ensemble="lora"`` it must be None (choose the adapted
        modules with ``lora_target_modules``).
    %(batch_size)s
    feature_dtype : {"auto", "float32", "float16"}, default="auto"
        Storage type of the cached training features. float16 halves their
        memory or disk; the scores are still computed in float64. "auto" keeps
        them in float32 in memory (and on a Dask cluster's workers) and in
        float16 when they go to disk (``features_dir``, or a lack of memory).
        float16 features are checked as they are written: a chunk whose
        features overflow float16 or lose more than 1% of their norm to its
        rounding (gradients too large or too small for it) is refused with a
        ``ValueError`` naming float32.
    features_dir : str or None, default=None
        Directory where the training features are written as a memory-mapped
        ``.npy`` file. None keeps them in memory unless they would take over half
        of the memory that the rest of the fit leaves available (see
        ``plan_memory``), in which case a temporary directory is used. Before
        any training the directory is checked to be writable and to have room for
        the features; the file's space is then reserved before it is written, so a
        disk that fills up gives a ``ValueError`` naming the bytes needed. A
        completed refit replaces the file (an interrupted one leaves it), and the
        file (and any temporary directory) is removed when the estimator is
        refitted or garbage collected.
    cluster_features : bool or "auto", default="auto"
        Keep the training features on the workers of a Dask cluster: each shard of
        the training set is featurized, stored and scored on the worker that holds
        it, and only the residuals, the fitted curvature and the results come back
        (see "Clusters" in the user guide). ``"auto"``: when ``fit`` runs inside
        ``joblib.parallel_config(backend="dask")`` with a ``distributed.Client``
        and ``features_dir`` is None; True: always (refused without a Dask
        backend); False: the features come back to this process. The fit then
        lives on the cluster: attribute, most_influential and self_attribute need
        the client open, and a pickled copy gathers the features.
    %(device)s
    %(n_jobs)s
    %(random_state)s
    score_n_subsets : int, default=50
        Retrained subset models behind ``score``.
    score_subset_fraction : float, default=0.5
        Fraction of the training set in each of those subsets.
    retrain_estimator : skorch net or None, default=None
        With a frozen ``estimator``: the unfitted net that ``score``,
        ``calibrate_units`` and :func:`~sktda.model_selection.removal_effect`
        retrain on subsets of the training data, the recipe of the frozen net
        (its module class, or an instance holding the weights its training
        started from, with ``pretrained=True``). None retrains the frozen net's
        unfitted clone, which is refused when its module is the trained instance
        itself (:func:`~sktda.frozen_net` makes such nets).
    %(verbose)s

    Attributes
    ----------
    %(estimators_)s
    %(ensemble_)s
    n_members_ : int
        Ensemble members the gradients are averaged over (``n_models`` times
        ``n_masks`` or ``n_adapters``; ``n_models`` with ``mask_gradients=False``).
    %(classes_)s
    %(n_features_in_)s
    %(feature_names_in_)s
    method_ : str
        The method used (``method="auto"`` resolved).
    train_features_ : ndarray of shape (n_feature_sets, n_train, k)
        Projected training gradients, one set per member (and per TracIn
        checkpoint of each member); per layer, side by side, for ``"kfac"`` and
        ``"ekfac"``.
    train_residuals_ : ndarray of shape (n_feature_sets, n_train)
        The residual ``-dL/df`` of every training sample in every feature set
        (``1 - p`` for classifiers, twice ``y - f`` for regressors).
    units_scale_ : float
        Set by ``calibrate_units``: the factor that turns a score into the
        predicted change of the test target when the training sample is added
        (``attribute(..., units="target")``).
    units_correlation_ : float
        Set by ``calibrate_units``: the Pearson correlation, on the calibration
        set, between the retrained subset models' outputs and the outputs the
        calibrated scores predict (both centred per test sample).
    costs_ : dict
        ``train_seconds``, ``featurize_seconds``, ``feature_bytes``,
        ``model_bytes`` and ``n_members``.

    See Also
    --------
    sktda.OutlierGradientDetector : detrimental samples from gradient outliers.
    sktda.metrics.linear_datamodeling_score : the quality measure behind ``score``.

    References
    ----------
    .. [1] Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023.
    .. [2] Deng et al., "Efficient Ensembles Improve Training Data Attribution",
       2024.
    .. [3] Pruthi et al., "Estimating Training Data Influence by Tracing Gradient
       Descent", NeurIPS 2020.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from sktda import EnsembleAttributor
    >>> from sktda.datasets import load_digits_split
    >>> from sktda.models import MLP
    >>> X_train, X_test, y_train, y_test = load_digits_split(n_train=200, n_test=10)
    >>> net = NeuralNetClassifier(MLP, module__n_features=64, module__n_outputs=10,
    ...                           criterion=torch.nn.CrossEntropyLoss, max_epochs=5,
    ...                           lr=0.05, train_split=None, verbose=0)
    >>> attr = EnsembleAttributor(net, method="trak", n_models=2, random_state=0)
    >>> attr.fit(X_train, y_train).attribute(X_test, y_test).shape
    (10, 200)
    """

    _parameter_constraints: dict = {
        **GradientEstimator._parameter_constraints,
        "method": [StrOptions(set(METHODS) | {"auto"})],
        "ensemble": [StrOptions({"independent", "dropout", "lora"})],
        "n_adapters": [Interval(numbers.Integral, 1, None, closed="left")],
        "mask_gradients": ["boolean"],
        "lora_rank": [Interval(numbers.Integral, 1, None, closed="left")],
        "lora_target_modules": [list, None],
        "lora_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_checkpoints": [Interval(numbers.Integral, 1, None, closed="left")],
        "damping": [Interval(numbers.Real, 0, None, closed="left"), StrOptions({"auto"})],
        "target": [StrOptions(set(TARGETS)), callable],
        "normalize": [StrOptions({"auto", "relatif"}), None],
        "feature_dtype": [StrOptions({"auto", "float32", "float16"})],
        "features_dir": [str, os.PathLike, None],
        "cluster_features": ["boolean", StrOptions({"auto"})],
        "score_n_subsets": [Interval(numbers.Integral, 3, None, closed="left")],
        "score_subset_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "retrain_estimator": "no_validation",  # checked where it is retrained, as estimator is
    }

    def __init__(
        self,
        estimator,
        *,
        method="auto",
        ensemble="independent",
        n_models=1,
        n_masks=5,
        n_adapters=5,
        dropout_rate=None,
        mask_gradients=True,
        lora_rank=8,
        lora_target_modules=None,
        lora_epochs=5,
        n_checkpoints=5,
        checkpoints=None,
        proj_dim=2048,
        projection="gaussian",
        gradient_path="auto",
        pretrained=False,
        damping="auto",
        target="auto",
        normalize="auto",
        layers=None,
        batch_size=256,
        feature_dtype="auto",
        features_dir=None,
        cluster_features="auto",
        device="auto",
        n_jobs=None,
        random_state=None,
        score_n_subsets=50,
        score_subset_fraction=0.5,
        retrain_estimator=None,
        verbose=0,
    ):
        self.estimator = estimator
        self.method = method
        self.ensemble = ensemble
        self.n_models = n_models
        self.n_masks = n_masks
        self.n_adapters = n_adapters
        self.dropout_rate = dropout_rate
        self.mask_gradients = mask_gradients
        self.lora_rank = lora_rank
        self.lora_target_modules = lora_target_modules
        self.lora_epochs = lora_epochs
        self.n_checkpoints = n_checkpoints
        self.checkpoints = checkpoints
        self.proj_dim = proj_dim
        self.projection = projection
        self.gradient_path = gradient_path
        self.pretrained = pretrained
        self.damping = damping
        self.target = target
        self.normalize = normalize
        self.layers = layers
        self.batch_size = batch_size
        self.feature_dtype = feature_dtype
        self.features_dir = features_dir
        self.cluster_features = cluster_features
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.score_n_subsets = score_n_subsets
        self.score_subset_fraction = score_subset_fraction
        self.retrain_estimator = retrain_estimator
        self.verbose = verbose

    # ------------------------------------------------------------------ fit
    def _method(self, task=None):
        """The method's class for ``task`` (the fitted one by default):
        ``method="auto"`` is EK-FAC for a language model's sequence log-likelihood
        and TRAK otherwise."""
        name = self.method
        if name == "auto":
            name = "ekfac" if (task or self._task).is_sequence else "trak"
        return METHODS[name]

    def _damping(self, method) -> float:
        return method.default_damping if self.damping == "auto" else self.damping

    def _check_fit(self, task):
        method = self._method(task)
        if self.cluster_features is True and self.features_dir is not None:
            raise ValueError(
                "cluster_features=True keeps the training features on the Dask workers, and "
                f"features_dir={self.features_dir!r} asks for them in a file here: set one of them."
            )
        nets = self._frozen_nets()
        if method.needs_checkpoints and nets is not None and self.checkpoints is None:
            raise ValueError(
                "method='tracin' sums over checkpoints along training, and a frozen net comes without "
                "them. Pass your own: checkpoints=[(state_dict or path, learning_rate), ...] (one list per "
                "frozen net), or use another method (grad_dot is TracIn at the final weights alone)."
            )
        if self.retrain_estimator is not None and nets is None:
            raise ValueError(
                "retrain_estimator is the recipe that retrains a frozen net (for score, calibrate_units "
                "and removal_effect); this estimator is an unfitted net, which is its own recipe. Leave "
                "retrain_estimator=None."
            )
        if method.needs_checkpoints and self.ensemble == "lora":
            raise ValueError(
                "method='tracin' needs checkpoints of the differentiated parameters, and "
                "LoRA adapters have none from base training; use ensemble='independent' "
                "or 'dropout' with TracIn, or another method with LoRA."
            )
        if method.inverts and self.damping == 0:
            warnings.warn(
                f"damping=0 with method={self.method!r}: the matrix inverted is singular "
                "whenever proj_dim exceeds what the training gradients span, and the "
                "attributions are then numerically unstable. Use damping > 0 (default 'auto').",
                UserWarning,
                stacklevel=3,
            )
        if self.features_dir is not None:
            check_writable_directory(self.features_dir)

    def _client(self):
        """The Dask client whose workers keep the training features (see
        ``cluster_features``), or None."""
        if self.cluster_features is False or (
            self.cluster_features == "auto" and self.features_dir is not None
        ):
            return None
        client = super()._client()
        if client is None and self.cluster_features is True:
            raise ValueError(
                "cluster_features=True keeps the training features on a Dask cluster, and no Dask "
                "backend is active. Fit inside joblib.parallel_config(backend='dask') with a "
                "distributed.Client, or set cluster_features='auto' or False."
            )
        return client

    def _check_resources(self, X, task, module, strategy, device) -> FitPlan:
        sizes = self._fit_sizes(X, task, module, strategy, device)
        on_workers = self._client() is not None
        resident = resident_sizes(sizes, self.feature_dtype, self.features_dir, on_workers)
        # sized once: the plan reads the same stages
        plan = None if on_workers else self._memory_plan(X, module, sizes, resident, strict=False)
        check_fit_resources(resident, plan, on_workers)
        # the same decisions when the features are written
        return FitPlan(resident.storage, None if plan is None else plan.chunk_rows)

    def _fit_sizes(self, X, task, module, strategy, device) -> FitSizes:
        """The :class:`~sktda._resources.FitSizes` of this fit, sized from the
        untrained ``module`` and the validated inputs ``X``."""
        method = self._method(task)
        n_members = self._n_models() * strategy.members_per_model
        if method.needs_checkpoints:
            n_members *= self._checkpoints_per_model()
        member = strategy.sizing_member(module)
        blocks, dense = feature_blocks(member, self._gradient_config(task, device))
        return FitSizes(
            n=n_samples(X),
            n_models=self._n_models(),
            n_members=n_members,
            blocks=blocks,
            dense=dense,
            curvature=("per_layer" if method.per_layer else "gram") if method.inverts else None,
            param_bytes=sum(p.numel() * p.element_size() for p in module.parameters()),
            input_bytes=input_bytes(X),
            copied_bytes=copied_bytes(X),
        )

    def _memory_plan(self, X, module, sizes, resident, n_test: int = 0, strict=True) -> MemoryPlan | None:
        """What this fit will hold (see :class:`~sktda.MemoryPlan`), with the
        featurization chunk shrunk where ``batch_size`` rows would not fit in the
        memory available. Not ``strict``: None where the module cannot take a
        sample yet (the training guard then says why, with what the net needs)."""
        from joblib import effective_n_jobs

        try:
            per_row = row_bytes(module, to_torch(take(X, slice(0, 1))))
        except Exception as exc:
            if not strict:
                return None
            raise ValueError(
                "plan_memory sizes training by one forward pass of the untrained module on a training "
                f"sample, and it failed ({type(exc).__name__}: {exc}). A module that a callback sizes "
                "when training begins cannot be planned: build it at its final size."
            ) from exc
        nets = self._frozen_nets()
        client = self._client()
        return memory_plan(
            sizes,
            resident,
            row_bytes=per_row,
            training_rows=min((self.estimator if nets is None else nets[0]).batch_size, sizes.n),
            trains=nets is None or self.ensemble == "lora",  # a frozen net is not trained
            at_once=min(self._n_models(), effective_n_jobs(self.n_jobs)),
            chunk_rows=min(self.batch_size, sizes.n),
            n_workers=0 if client is None else max(1, len(client.scheduler_info()["workers"])),
            n_test=n_test,
        )

    def plan_memory(self, X, y=None, n_test: int = 0) -> MemoryPlan:
        """The memory a fit on ``(X, y)`` would need, stage by stage, before any
        training: the models, training, sktda's copy of the inputs, the features
        (in memory, or on disk where ``features_dir`` or a lack of memory puts
        them; inside ``joblib.parallel_config(backend="dask")``, on the cluster's
        workers), the curvature, the streamed row blocks, and ``attribute``'s
        dense matrix for ``n_test`` test samples.

        Parameters
        ----------
        X, y : as in ``fit``
        n_test : int, default=0
            Test samples attributed at once by ``attribute``.

        Returns
        -------
        sktda.MemoryPlan
            Bytes per stage, with ``fit_peak`` and ``peak`` (scoring included), in
            this process, beyond what it holds already (the interpreter, torch and
            the caller's own inputs). ``print(plan)`` shows them in MiB.
        """
        self._validate_params()
        check_scalar(n_test, "n_test", numbers.Integral, min_val=0)
        probe = self._unfitted()  # checks set attributes: not on this estimator
        task, module, X, _, strategy = probe._prepare(X, y)
        sizes = probe._fit_sizes(X, task, module, strategy, resolve_device(self.device))
        resident = resident_sizes(sizes, self.feature_dtype, self.features_dir, probe._client() is not None)
        return probe._memory_plan(X, module, sizes, resident, n_test)

    def _target(self):
        return self.target

    def _checkpoints_per_model(self) -> int:
        """TracIn's checkpoints of each model: recorded along training, or given."""
        nets = self._frozen_nets()
        if nets is None:
            return len(checkpoint_epochs(self.estimator.max_epochs, self.n_checkpoints))
        return len(checkpoints_per_net(self.checkpoints, len(nets))[0])  # counted, not loaded

    def _n_checkpoints(self):
        return self.n_checkpoints if self._method().needs_checkpoints else None

    def _per_layer(self):
        return self._method().per_layer

    def _fit_features(self, X, y, *, task, device):
        start = time.perf_counter()
        method = self._method()()
        members = self.ensemble_.members(checkpoints=method.needs_checkpoints)
        storage = self._fit_plan.storage
        dtype = storage.dtype
        file = None
        if storage.directory is not None:  # held by the fit from here, so that a failure removes it
            file = self._file = FeatureFile(storage.directory, own_directory=self.features_dir is None)
        shards, residuals, layouts, factors = self._training_features(
            members, X, y, task=task, device=device, dtype=dtype, out_file=None if file is None else file.path
        )
        _, n, k = shards.shape
        n_members = self._n_models() * self.ensemble_.strategy.members_per_model
        self._store = FeatureStore(
            shards, [m.coef for m in members], n, k, file, sets_per_member=len(members) // n_members
        )
        self._store.states = [
            method.fit(self._store.member_rows(i, device), self._damping(method), layout, factor)
            for i, (layout, factor) in enumerate(zip(layouts, factors))
        ]
        self.method_ = method.name
        self.train_features_, self.train_residuals_ = shards.array(), residuals
        if self.normalize == "relatif" or (self.normalize == "auto" and not self._task.is_sequence):
            # a scale per training sample: float32 is ample, and halves this step's cost
            self._store.column_scale = relatif_scale(
                self._store.self_attribution(method, device, torch.float32)
            )
        self.n_members_ = n_members
        self._n_features_out = len(y)
        # a copy: the fitted estimator must not change when the caller's arrays do
        self._X_fit, self._y_fit = copy_inputs(X), np.array(y)
        return {
            "featurize_seconds": time.perf_counter() - start,
            "feature_bytes": self._store.nbytes,
            "model_bytes": self.ensemble_.serving_bytes(),
            "n_members": self.n_members_,
        }

    # ------------------------------------------------------------ attribute
    def attribute(self, X, y=None, *, groups=None, return_std=False, units="score"):
        """Attribution of every training sample (or group of them) to every test
        sample.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_test, n_features)
            Test inputs.
        y : array-like of shape (n_test,), default=None
            Test targets whose prediction is attributed; None uses the ensemble's
            predicted labels (irrelevant for regressors, whose target is the
            prediction itself).
        groups : array-like of shape (n_train,), default=None
            One label per training sample (a data source, an annotator, a file).
            The scores are then summed per group, columns in ``np.unique(groups)``
            order. A group's score is the sum of its samples' scores (normalised
            as ``normalize`` says): the linear datamodel makes that sum the
            predicted effect of the whole group. Each member's training gradients
            are summed per group before the test side meets them, so this costs
            one pass over the features, and less than per-sample attribution.
        return_std : bool, default=False
            Also return the standard error of each score across the ensemble's
            members: the standard deviation of the members' estimates over the
            square root of their number (``n_members_``; TracIn's checkpoints of
            one model are one member). Needs at least 2 members.
        units : {"score", "target"}, default="score"
            ``"score"``: the method's own scale (normalised as ``normalize``
            says). ``"target"``: those scores times ``units_scale_`` (set by
            ``calibrate_units``), each the predicted change in the test target
            (the margin, or the regression output) that the training sample
            causes; removing it is predicted to change the target by minus that.

        Returns
        -------
        A : ndarray of shape (n_test, n_train), or (n_test, n_groups) with groups
            ``A[i, j] > 0``: training sample ``j`` raised the test target ``i``
            (a proponent); ``< 0``: an opponent. With the training features on a
            Dask cluster (``cluster_features``), a lazy dask array, chunked by
            shard and computed on the workers, when the dense matrix would take
            over a quarter of this process's available memory; numpy otherwise.
        std : ndarray of the same shape
            With ``return_std=True``: the standard errors.
        """
        check_is_fitted(self)
        if units not in ("score", "target"):
            raise ValueError(f"units must be 'score' or 'target', got {units!r}.")
        factor = 1.0
        if units == "target":
            if not hasattr(self, "units_scale_"):
                raise ValueError(
                    "units='target' needs the calibration of the scores to the target's units: call "
                    "calibrate_units(X, y) first (it retrains the subset models that score uses)."
                )
            factor = self.units_scale_
        method = self._method()()
        if groups is not None:
            return _scaled(self._group_scores(X, y, *self._group_codes(groups), return_std), factor)
        lazy = self._store.shards.remote and not dense_fits(n_samples(X), self._store.n)
        if lazy and return_std:
            raise ValueError(
                "return_std=True needs the dense (n_test, n_train) matrix in this process, and with the "
                "features on the cluster it would not fit: attribute fewer test samples at a time, or pass groups."
            )
        if not lazy:
            check_dense_fits(n_samples(X), self._store.n)
        test_phis, device = self._test_features(X, y)
        if lazy:
            return self._store.columns_array(method, test_phis)
        out = self._store.columns(method, test_phis, device, return_std=return_std)
        return _scaled(out, factor)

    def _group_codes(self, groups) -> tuple[np.ndarray, int]:
        return group_codes(groups, self._store.n)

    def _group_scores(self, X, y, codes, n_groups, return_std):
        """The test samples' scores summed per group (and their standard errors),
        as tensors: what ``attribute`` and ``most_influential`` rank by group."""
        test_phis, device = self._test_features(X, y)
        return self._store.group_columns(
            self._method()(), test_phis, codes, n_groups, device, return_std=return_std
        )

    def transform(self, X) -> np.ndarray:
        """Attributions for the ensemble's own predictions on ``X``.

        Parameters
        ----------
        X : array-like of shape (n_test, n_features)
            Test inputs.

        Returns
        -------
        A : ndarray of shape (n_test, n_train)
            As in ``attribute``, for the predicted labels.
        """
        return self.attribute(X, None)

    def self_attribute(self) -> np.ndarray:
        """Self-influence of each training sample: its attribution to its own
        training loss target. Large values flag atypical or mislabeled samples.

        Returns
        -------
        scores : ndarray of shape (n_train,)
            The diagonal of ``attribute(X_train, y_train)``, in row chunks.
        """
        check_is_fitted(self)
        scores = self._store.self_attribution(self._method()(), resolve_device(self.device))
        return scores.cpu().numpy().astype(np.float64)

    def most_influential(self, X, y=None, k: int = 10, *, groups=None, return_std=False) -> Influence:
        """The ``k`` strongest proponents and opponents per test sample.

        Streams over the training set in chunks sized by scikit-learn's
        ``working_memory`` (``sklearn.set_config``), so the full (n_test, n_train)
        matrix is never held.

        Parameters
        ----------
        X : array-like of shape (n_test, n_features)
            Test inputs.
        y : array-like of shape (n_test,), default=None
            As in ``attribute``.
        k : int, default=10
            Number of proponents and of opponents, at most ``n_train`` (or the
            number of groups).
        groups : array-like of shape (n_train,), default=None
            One label per training sample: rank the groups by their summed
            scores (see ``attribute``), and return indices into
            ``np.unique(groups)``.
        return_std : bool, default=False
            Also return the scores' standard errors across members
            (``proponent_std``, ``opponent_std``), so that
            ``Influence.distinguishable`` can say which are distinguishable from
            zero.

        Returns
        -------
        Influence
            ``proponents``/``opponents`` (n_test, k) training indices (or group
            indices) and their ``proponent_scores``/``opponent_scores``.
        """
        check_is_fitted(self)
        if groups is not None:
            codes, n_groups = self._group_codes(groups)
            check_scalar(k, "k", numbers.Integral, min_val=1, max_val=n_groups)
            out = self._group_scores(X, y, codes, n_groups, return_std)
            scores, std = out if return_std else (out, None)
            index = torch.arange(n_groups, device=scores.device).expand(len(scores), -1)
            found = [scores, index] + ([] if std is None else [std])
            top, bottom = merge_topk(None, found, k, largest=True), merge_topk(None, found, k, largest=False)
        else:
            check_scalar(k, "k", numbers.Integral, min_val=1, max_val=self._store.n)
            test_phis, device = self._test_features(X, y)
            top, bottom = self._store.top_k(self._method()(), test_phis, k, device, return_std=return_std)

        def numpy(t):
            return t.cpu().numpy()

        return Influence(
            proponents=numpy(top[1]),
            proponent_scores=numpy(top[0]).astype(np.float64),
            opponents=numpy(bottom[1]),
            opponent_scores=numpy(bottom[0]).astype(np.float64),
            proponent_std=numpy(top[2]).astype(np.float64) if return_std else None,
            opponent_std=numpy(bottom[2]).astype(np.float64) if return_std else None,
        )

    def score(self, X, y) -> float:
        """Linear datamodeling score of the attributions on ``(X, y)``.

        The ground truth is ``score_n_subsets`` models retrained on random subsets
        of the training data seen in ``fit`` (see
        :func:`sktda.model_selection.subset_retraining`); it is cached by data
        and net configuration, so a grid search over ensemble strategies retrains
        once per fold.

        Parameters
        ----------
        X : array-like of shape (n_test, n_features)
            Test inputs.
        y : array-like of shape (n_test,)
            Test targets whose prediction is attributed and measured.

        Returns
        -------
        lds : float
            Mean Spearman correlation over test samples (higher is better).
        """
        truth = self._subset_truth(X, y, "score")
        return linear_datamodeling_score(self.attribute(X, y), truth.subsets, truth.outputs)

    def calibrate_units(self, X, y):
        """Calibrate the scores to the test target's own units, on the subset
        models that ``score`` trains (the same cache: after ``score(X, y)`` this
        retrains nothing).

        The linear datamodel predicts a subset model's test target as a constant
        plus the sum of its training samples' effects. ``units_scale_`` is the one
        factor, fitted by least squares over every subset and test sample, that
        turns the scores (normalised as ``normalize`` says) into those effects;
        ``units_correlation_`` says how well the calibrated sums predict the
        retrained models. The subsets hold
        ``score_subset_fraction`` of the training set, so the effect of removing a
        handful of samples from the full set is an extrapolation:
        :func:`sktda.model_selection.removal_effect` measures it by retraining.

        Parameters
        ----------
        X : array-like of shape (n_test, n_features)
            Test inputs to calibrate on.
        y : array-like of shape (n_test,)
            Their targets.

        Returns
        -------
        self : EnsembleAttributor
        """
        truth = self._subset_truth(X, y, "calibrate_units")
        scale, correlation = units_calibration(self.attribute(X, y), truth.subsets, truth.outputs)
        self.units_scale_, self.units_correlation_ = scale, correlation
        # part of this fit's state: a refit forgets it
        self._fit_names = tuple(dict.fromkeys((*self._fit_names, "units_scale_", "units_correlation_")))
        return self

    def _subset_truth(self, X, y, caller: str):
        """The retrained subset models' outputs on ``(X, y)`` (cached)."""
        check_is_fitted(self)
        if y is None:
            raise ValueError(f"{caller} needs the test targets y: it measures how y's prediction moves.")
        X_valid, _ = validate_predict_data(self, X, y, self._task)
        return self.retraining_.subsets(
            X_valid, y, n_subsets=self.score_n_subsets, subset_fraction=self.score_subset_fraction
        )

    @property
    def retraining_(self) -> Retraining:
        """How this fit's models are retrained (see
        :class:`sktda.model_selection.Retraining`): the net (a frozen net's recipe,
        or ``retrain_estimator``), the training data as given, the target,
        ``pretrained``, the device, ``n_jobs`` and the seed (``random_state``, or
        0). What ``score``, ``calibrate_units`` and ``removal_effect`` retrain."""
        check_is_fitted(self)
        seed = self.random_state if isinstance(self.random_state, numbers.Integral) else 0
        return Retraining(
            estimator=self.estimator if self.retrain_estimator is None else self.retrain_estimator,
            X=self._X_fit,
            y=self._decode(self._y_fit),
            target=self.target,
            pretrained=self.pretrained,
            classes=getattr(self, "classes_", None),
            device=self.device,
            n_jobs=self.n_jobs,
            random_state=int(seed),
        )

    # -------------------------------------------------------------- helpers
    def _discard(self):
        file = self.__dict__.pop("_file", None)
        if file is not None:
            file.release()

    def _test_features(self, X, y):
        task, X, y, device = self._prepare_predict(X, y)
        members = self.ensemble_.members(checkpoints=self._method().needs_checkpoints)
        features = self._featurize(members, X, y, task=task.as_test(), device=device)
        return [to_torch(f.phi).to(device, SCORE_DTYPE) for f in features], device

    def _decode(self, y: np.ndarray) -> np.ndarray:
        return self.classes_[y] if hasattr(self, "classes_") else y

    def __getstate__(self):
        state = dict(super().__getstate__())  # scikit-learn's may be this estimator's own __dict__
        state.pop("_file", None)  # a copy does not own the file
        if "_store" in state:  # features kept on a cluster are gathered into the copy
            state["_store"] = state["_store"].gathered()
            state["train_features_"] = state["_store"].shards.array()
        return state


def _scaled(out, factor: float):
    """Scores (and their standard errors, when ``out`` is a pair) as float64 numpy
    arrays, times ``factor`` (the standard errors times its size: they stay
    standard errors when a calibration's factor is negative)."""
    if isinstance(out, tuple):
        scores, std = out
        return _scaled(scores, factor), _scaled(std, abs(factor))
    return out.cpu().numpy().astype(np.float64) * factor
