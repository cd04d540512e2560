"""EnsembleAttributor: training data attribution with cheap ensembles."""

from __future__ import annotations

import numbers
import os
import tempfile
import time
import uuid
import warnings
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _num_samples, check_is_fitted

from ._data import to_tensor, validate_fit_data, validate_predict_data
from ._ensembles import ENSEMBLES, TrainedEnsemble
from ._gradients import GRADIENT_PATHS, feature_dim, featurize_members
from ._methods import METHODS, attribution_block, self_attribution
from ._nets import check_net, resolve_device
from .metrics import linear_datamodeling_score
from .model_selection import subset_retraining

__all__ = ["EnsembleAttributor", "Influence"]

# Bytes of scores handled at once when streaming over training chunks.
_CHUNK_BYTES = 1 << 28


class Influence(NamedTuple):
    """Top-k training samples per test sample: indices into the training set and
    their scores, proponents by decreasing score, opponents by increasing score."""

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


class EnsembleAttributor(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Training data attribution averaged over an ensemble of skorch nets.

    ``fit`` trains the ensemble members and caches projected per-sample gradient
    features of the training set; ``attribute`` scores how much every training
    sample drove each test prediction, averaged over the members. Ensembling is what
    makes gradient-based attribution reliable on non-convex models.

    Parameters
    ----------
    estimator : skorch.NeuralNetClassifier or skorch.NeuralNetRegressor
        Unfitted skorch net, cloned for every trained model. Its criterion must be
        ``CrossEntropyLoss`` (logits), ``NLLLoss`` (probabilities) or ``MSELoss``.
    method : {"trak", "if", "tracin", "grad_dot", "grad_cos"}, default="trak"
        Scoring rule. ``"trak"``: TRAK (Park et al., 2023); ``"if"``: influence
        function with a damped empirical-Fisher inverse in projected gradient
        space; ``"tracin"``: TracIn over ``n_checkpoints`` checkpoints weighted by
        the learning rate; ``"grad_dot"`` / ``"grad_cos"``: inner product / cosine
        of test-target and training-loss gradients.
    ensemble : {"independent", "dropout", "lora"}, default="independent"
        How members are made (Deng et al., 2024). ``"independent"``: ``n_models``
        nets trained from different seeds; ``"dropout"``: each trained model
        yields ``n_masks`` members, one fixed dropout mask each; ``"lora"``: each
        trained model is the base of ``n_adapters`` LoRA adapters, and gradients
        are taken with respect to the adapters only. ``n_models > 1`` with
        ``"dropout"`` or ``"lora"`` gives the hybrids.
    n_models : int, default=1
        Independently trained models.
    n_masks : int, default=5
        Fixed dropout masks per model (``ensemble="dropout"``).
    n_adapters : int, default=5
        LoRA adapters per model (``ensemble="lora"``).
    dropout_rate : float or None, default=None
        Dropout rate of the masks; None keeps each dropout layer's own rate.
    mask_gradients : bool, default=True
        With ``ensemble="dropout"``: True takes gradients under every mask; False
        takes them from the unmasked model and lets the masks enter only through
        ``-dL/df`` (TRAK's ``1 - p``), averaged over masks, which costs one
        backward pass per model instead of one per mask.
    lora_rank : int, default=4
        Rank of the LoRA adapters.
    lora_target_modules : list of str or None, default=None
        Modules that get adapters; None means every ``nn.Linear`` but the output.
    lora_epochs : int, default=5
        Fine-tuning epochs per adapter.
    n_checkpoints : int, default=5
        Checkpoints per model for ``method="tracin"``, evenly spread over the
        epochs, the last included.
    proj_dim : int or None, default=2048
        Dimension of the random projection of the gradients. When a member has at
        most ``proj_dim`` differentiated parameters (or with None), the exact
        gradient is used.
    projection : {"gaussian", "rademacher"}, default="gaussian"
        Distribution of the projection's entries.
    gradient_path : {"auto", "linear", "vmap"}, default="auto"
        How per-sample gradients are computed. ``"linear"``: when every
        differentiated parameter belongs to an ``nn.Linear``, one forward and
        backward pass per chunk and a Kronecker-structured projection of each
        layer's input and output gradient (the full gradient is never formed);
        ``"vmap"``: ``torch.func.vmap(grad)`` and a dense projection, for any
        module. ``"auto"`` takes the linear path when it applies and a projection
        is needed.
    damping : float, default=1.0
        Damping of the inverses of TRAK and the influence function, relative to
        the mean eigenvalue of the matrix inverted (so it is blind to the scale of
        the gradients). Heavy damping measured best on digits (see the README's
        LDS benchmark): it keeps the inverse from amplifying the many directions
        that the projected training gradients barely span.
    layers : None, "all", "last" or list of str, default=None
        Parameters to differentiate: all (None or "all"), the output layer's
        ("last"), or those of the named modules.
    batch_size : int, default=256
        Samples per chunk of per-sample gradients (bounds memory, not results).
    feature_dtype : {"float32", "float16"}, default="float32"
        Storage type of the cached training features (float16 halves their
        memory; scores are still computed in float32).
    features_dir : str or None, default=None
        Directory where the training features are written as a memory-mapped
        ``.npy`` file. None keeps them in memory unless they would take over half
        the available memory, in which case a temporary directory is used.
    device : str, default="auto"
        Torch device for training and gradients; "auto" is CUDA when available.
    n_jobs : int or None, default=None
        Models trained and featurized in parallel through
        ``sklearn.utils.parallel.Parallel`` (so joblib's Dask or Ray backends
        apply). Results do not depend on it.
    random_state : int, RandomState instance or None, default=None
        Seeds training, dropout masks, adapters and projections.
    score_n_subsets : int, default=50
        Retrained subset models behind ``score``.
    score_subset_fraction : float, default=0.5
        Fraction of the training set in each of those subsets.
    verbose : int, default=0
        Progress bars for training and featurization when > 0.

    Attributes
    ----------
    estimators_ : list of skorch nets
        The trained models.
    n_members_ : int
        Ensemble members the gradients are averaged over (``n_models`` times
        ``n_masks`` or ``n_adapters``; ``n_models`` with ``mask_gradients=False``).
    classes_ : ndarray of shape (n_classes,)
        Class labels (classifiers only).
    n_features_in_ : int
        Number of features seen in ``fit``.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Feature names seen in ``fit``, when X had string column names.
    train_features_ : ndarray of shape (n_blocks, n_train, k)
        Projected training gradients of every member (and TracIn checkpoint).
    train_weights_ : ndarray of shape (n_blocks, n_train)
        ``-dL/df`` of every training sample under every block (``1 - p``).
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
        "estimator": "no_validation",
        "method": [StrOptions(set(METHODS))],
        "ensemble": [StrOptions(set(ENSEMBLES))],
        "n_models": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_masks": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_adapters": [Interval(numbers.Integral, 1, None, closed="left")],
        "dropout_rate": [Interval(numbers.Real, 0, 1, closed="neither"), None],
        "mask_gradients": ["boolean"],
        "lora_rank": [Interval(numbers.Integral, 1, None, closed="left")],
        "lora_target_modules": [list, None],
        "lora_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_checkpoints": [Interval(numbers.Integral, 1, None, closed="left")],
        "proj_dim": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "projection": [StrOptions({"gaussian", "rademacher"})],
        "gradient_path": [StrOptions(set(GRADIENT_PATHS))],
        "damping": [Interval(numbers.Real, 0, None, closed="left")],
        "layers": [None, str, list],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "feature_dtype": [StrOptions({"float32", "float16"})],
        "features_dir": [str, os.PathLike, None],
        "device": [str],
        "n_jobs": [numbers.Integral, None],
        "random_state": ["random_state"],
        "score_n_subsets": [Interval(numbers.Integral, 3, None, closed="left")],
        "score_subset_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        estimator,
        *,
        method="trak",
        ensemble="independent",
        n_models=1,
        n_masks=5,
        n_adapters=5,
        dropout_rate=None,
        mask_gradients=True,
        lora_rank=4,
        lora_target_modules=None,
        lora_epochs=5,
        n_checkpoints=5,
        proj_dim=2048,
        projection="gaussian",
        gradient_path="auto",
        damping=1.0,
        layers=None,
        batch_size=256,
        feature_dtype="float32",
        features_dir=None,
        device="auto",
        n_jobs=None,
        random_state=None,
        score_n_subsets=50,
        score_subset_fraction=0.5,
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
        self.proj_dim = proj_dim
        self.projection = projection
        self.gradient_path = gradient_path
        self.damping = damping
        self.layers = layers
        self.batch_size = batch_size
        self.feature_dtype = feature_dtype
        self.features_dir = features_dir
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.score_n_subsets = score_n_subsets
        self.score_subset_fraction = score_subset_fraction
        self.verbose = verbose

    # ------------------------------------------------------------------ fit
    def fit(self, X, y):
        """Train the ensemble and cache the training set's gradient features.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Training inputs.
        y : array-like or torch.Tensor of shape (n_samples,)
            Training targets: class labels for classifiers, values for regressors.

        Returns
        -------
        self : EnsembleAttributor
        """
        self._validate_params()
        task = check_net(self.estimator)
        X, y = validate_fit_data(self, X, y, task)
        strategy = self._strategy()
        method = METHODS[self.method]()
        if method.needs_checkpoints and self.ensemble == "lora":
            raise ValueError(
                "method='tracin' needs checkpoints of the differentiated parameters, and "
                "LoRA adapters have none from base training; use ensemble='independent' "
                "or 'dropout' with TracIn, or another method with LoRA."
            )
        device = resolve_device(self.device)

        start = time.perf_counter()
        self.ensemble_ = TrainedEnsemble.fit(
            strategy,
            self.estimator,
            X,
            y,
            n_models=self.n_models,
            random_state=self.random_state,
            device=device,
            n_jobs=self.n_jobs,
            verbose=self.verbose,
            n_checkpoints=self.n_checkpoints if method.needs_checkpoints else None,
            task=task,
            n_classes=len(getattr(self, "classes_", ())),
        )
        self.estimators_ = self.ensemble_.nets
        train_seconds = time.perf_counter() - start

        start = time.perf_counter()
        members = self.ensemble_.members(checkpoints=method.needs_checkpoints)
        dtype = np.dtype(self.feature_dtype)
        out_file = self._features_file(
            len(members) * len(X) * feature_dim(members[0], self.proj_dim) * dtype.itemsize
        )
        features = self._featurize(members, task, X, y, device, dtype, out_file)
        if out_file is not None:
            self.train_features_ = np.load(out_file, mmap_mode="r+")
        elif len(features) == 1:  # a single member's features are kept as they are: no copy
            self.train_features_ = features[0].phi[None]
        else:
            self.train_features_ = np.stack([f.phi for f in features])
        self.train_weights_ = np.stack([f.weight for f in features])
        self._block_weights = [m.weight for m in members]
        self._states = [method.fit(f.phi, f.weight, self.damping, device) for f in features]
        featurize_seconds = time.perf_counter() - start

        self.n_members_ = self.n_models * strategy.members_per_model
        self._n_features_out = X.shape[0]
        self._X_fit, self._y_fit = X, y
        self.costs_ = {
            "train_seconds": train_seconds,
            "featurize_seconds": featurize_seconds,
            "feature_bytes": int(self.train_features_.nbytes + self.train_weights_.nbytes),
            "model_bytes": self.ensemble_.serving_bytes(),
            "n_members": self.n_members_,
        }
        return self

    # ------------------------------------------------------------ attribute
    def attribute(self, X, y=None) -> np.ndarray:
        """Attribution of every training sample to every test sample.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_test, n_features)
            Test inputs.
        y : array-like of shape (n_test,), default=None
            Test targets whose prediction is attributed; None uses the ensemble's
            predicted labels (irrelevant for regressors, whose target is the
            prediction itself).

        Returns
        -------
        A : ndarray of shape (n_test, n_train)
            ``A[i, j] > 0``: training sample ``j`` raised the test target ``i``
            (a proponent); ``< 0``: an opponent.
        """
        check_is_fitted(self)
        _check_dense_fits(_num_samples(X), self.train_features_.shape[1])
        blocks, test_phis, device = self._test_features(X, y)
        A = attribution_block(METHODS[self.method](), blocks, test_phis, slice(None), device)
        return A.cpu().numpy().astype(np.float64)

    def transform(self, X) -> np.ndarray:
        """Attributions for the ensemble's own predictions on ``X``.

        Parameters
        ----------
        X : array-like of shape (n_test, n_features)

        Returns
        -------
        A : ndarray of shape (n_test, n_train)
        """
        return self.attribute(X, None)

    def self_attribute(self) -> np.ndarray:
        """Self-influence of each training sample: its attribution to its own
        training loss target. Large values flag atypical or mislabeled samples.

        Returns
        -------
        scores : ndarray of shape (n_train,)
        """
        check_is_fitted(self)
        device = resolve_device(self.device)
        return (
            self_attribution(METHODS[self.method](), self._blocks(), device).cpu().numpy().astype(np.float64)
        )

    def most_influential(self, X, y=None, k: int = 10) -> Influence:
        """The ``k`` strongest proponents and opponents per test sample.

        Streams over the training set in chunks, so the full (n_test, n_train)
        matrix is never held.

        Parameters
        ----------
        X : array-like of shape (n_test, n_features)
        y : array-like of shape (n_test,), default=None
            As in ``attribute``.
        k : int, default=10
            Number of proponents and of opponents, at most ``n_train``.

        Returns
        -------
        Influence
            ``proponents``/``opponents`` (n_test, k) training indices and their
            ``proponent_scores``/``opponent_scores``.
        """
        check_is_fitted(self)
        n_train = self.train_features_.shape[1]
        if not isinstance(k, numbers.Integral) or not 1 <= k <= n_train:
            raise ValueError(f"k must be an integer in [1, n_train={n_train}], got {k!r}.")
        blocks, test_phis, device = self._test_features(X, y)
        method = METHODS[self.method]()
        n_test = test_phis[0].shape[0]
        # bound both the score block and the float32 copy of the training features
        chunk = max(k, _CHUNK_BYTES // (4 * max(n_test, self.train_features_.shape[2])))
        top = bottom = None
        for start in range(0, n_train, chunk):
            scores = attribution_block(method, blocks, test_phis, slice(start, start + chunk), device)
            index = torch.arange(start, start + scores.shape[1], device=device).expand(n_test, -1)
            top = _merge_topk(top, scores, index, k, largest=True)
            bottom = _merge_topk(bottom, scores, index, k, largest=False)
        return Influence(
            proponents=top[1].cpu().numpy(),
            proponent_scores=top[0].cpu().numpy().astype(np.float64),
            opponents=bottom[1].cpu().numpy(),
            opponent_scores=bottom[0].cpu().numpy().astype(np.float64),
        )

    def score(self, X, y) -> float:
        """Linear datamodeling score of the attributions on ``(X, y)``.

        The ground truth is ``score_n_subsets`` models retrained on random subsets
        of the training data seen in ``fit``; it is cached by data and net
        configuration, so a grid search over ensemble strategies retrains once per
        fold.

        Returns
        -------
        lds : float
            Mean Spearman correlation over test samples (higher is better).
        """
        check_is_fitted(self)
        X, _ = validate_predict_data(self, X, y, check_net(self.estimator))
        seed = self.random_state if isinstance(self.random_state, numbers.Integral) else 0
        truth = subset_retraining(
            self.estimator,
            self._X_fit,
            self._decode(self._y_fit),
            X,
            y,
            n_subsets=self.score_n_subsets,
            subset_fraction=self.score_subset_fraction,
            random_state=seed,
            n_jobs=self.n_jobs,
            device=self.device,
        )
        return linear_datamodeling_score(self.attribute(X, y), truth.subsets, truth.outputs)

    # -------------------------------------------------------------- helpers
    def _strategy(self):
        return ENSEMBLES[self.ensemble](
            {
                "layers": self.layers,
                "n_masks": self.n_masks,
                "n_adapters": self.n_adapters,
                "dropout_rate": self.dropout_rate,
                "mask_gradients": self.mask_gradients,
                "lora_rank": self.lora_rank,
                "lora_target_modules": self.lora_target_modules,
                "lora_epochs": self.lora_epochs,
            }
        )

    def _features_file(self, nbytes: int) -> str | None:
        """Where the training features are memory-mapped: ``features_dir`` when
        set, a temporary directory when they would take over half the available
        memory, or nowhere (in memory)."""
        directory = self.features_dir
        if directory is None:
            available = _available_memory()
            if available is None or nbytes <= available // 2:
                return None
            directory = tempfile.mkdtemp(prefix="sktda-")
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, f"train_features_{uuid.uuid4().hex}.npy")

    def _featurize(self, members, task, X, y, device, dtype=np.float32, out_file=None):
        return featurize_members(
            members,
            task,
            self.proj_dim,
            self.projection,
            X,
            y,
            self.batch_size,
            device,
            self.n_jobs,
            self.verbose,
            self.gradient_path,
            dtype,
            out_file,
        )

    def _blocks(self) -> list:
        return list(zip(self._block_weights, self._states, self.train_features_, self.train_weights_))

    def _test_features(self, X, y):
        check_is_fitted(self)
        task = check_net(self.estimator)
        X, y = validate_predict_data(self, X, y, task)
        device = resolve_device(self.device)
        if y is None:
            y = self.ensemble_.predict_targets(X, task, self.batch_size, device)
        members = self.ensemble_.members(checkpoints=METHODS[self.method].needs_checkpoints)
        test_phis = [to_tensor(f.phi).to(device) for f in self._featurize(members, task, X, y, device)]
        return self._blocks(), test_phis, device

    def _decode(self, y: np.ndarray) -> np.ndarray:
        return self.classes_[y] if hasattr(self, "classes_") else y

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.allow_nan = False
        return tags


def _available_memory() -> int | None:
    """Bytes of physical memory available now (Linux), or None when unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_dense_fits(n_test: int, n_train: int) -> None:
    """Refuse a dense attribution matrix that cannot fit in memory, and warn when it
    would take a large share of it; ``most_influential`` streams instead."""
    available = _available_memory()
    needed = 12 * n_test * n_train  # float32 scores, then the float64 result
    if available is None or needed < available // 4:
        return
    message = (
        f"attribute would build a dense ({n_test}, {n_train}) matrix, about {needed / 2**30:.1f} GiB, "
        f"with {available / 2**30:.1f} GiB of memory available. Use most_influential(X, y, k), which "
        "streams over the training set, or attribute fewer test samples at a time."
    )
    if needed >= available:
        raise ValueError(message)
    warnings.warn(message, ResourceWarning, stacklevel=3)


def _merge_topk(current, scores, index, k: int, largest: bool):
    if current is not None:
        scores = torch.cat([current[0], scores], 1)
        index = torch.cat([current[1], index], 1)
    values, pos = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=largest, sorted=True)
    return values, torch.gather(index, 1, pos)
