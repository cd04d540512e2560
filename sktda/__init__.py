"""sktda: scikit-learn-style training data attribution and detrimental-sample
detection for PyTorch models wrapped by skorch."""

from ._nets import frozen_net
from ._resources import MemoryPlan
from .attribution import EnsembleAttributor, Influence
from .detection import OutlierGradientDetector
from .filtering import FilteredEstimator

__version__ = "0.1.0"

__all__ = [
    "EnsembleAttributor",
    "FilteredEstimator",
    "Influence",
    "MemoryPlan",
    "OutlierGradientDetector",
    "__version__",
    "frozen_net",
]
