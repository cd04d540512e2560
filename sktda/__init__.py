"""sktda: scikit-learn-style training data attribution and detrimental-sample
detection for PyTorch models wrapped by skorch."""

from .attribution import EnsembleAttributor, Influence

__version__ = "0.1.0"

__all__ = ["EnsembleAttributor", "Influence", "__version__"]
