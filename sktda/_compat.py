"""scikit-learn's private API, imported here and nowhere else.

sktda builds on helpers that scikit-learn does not promise to keep (parameter
validation, the fit context, chunk sizing, indexing and fit-parameter routing
helpers). Every use goes through this module, so that a change in scikit-learn
is met in one place, as imbalanced-learn meets it through ``sklearn_compat``.
"""

from sklearn.base import _fit_context as fit_context
from sklearn.utils import _safe_indexing as safe_indexing
from sklearn.utils._chunking import get_chunk_n_rows
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions, validate_params
from sklearn.utils.validation import _check_method_params as check_method_params
from sklearn.utils.validation import _estimator_has as estimator_has
from sklearn.utils.validation import _num_samples as num_samples

__all__ = [
    "HasMethods",
    "Interval",
    "StrOptions",
    "check_method_params",
    "estimator_has",
    "fit_context",
    "get_chunk_n_rows",
    "num_samples",
    "safe_indexing",
    "validate_params",
]
