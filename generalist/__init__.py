"""Stage 1: the generalist, one network over all classes."""
from .stage import load_generalist, run, train_generalist

__all__ = ["run", "load_generalist", "train_generalist"]
