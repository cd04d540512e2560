"""sktda: scikit-learn-style training data attribution and detrimental-sample
detection for PyTorch models wrapped by skorch."""

from ._features import MemoryPlan
from .attribution import EnsembleAttributor, Influence
from .detection import FilteredEstimator, OutlierGradientDetector

__version__ = "0.1.0"

__all__ = [
    "EnsembleAttributor",
    "FilteredEstimator",
    "Influence",
    "MemoryPlan",
    "OutlierGradientDetector",
    "__version__",
]
