"""Stage 1: the generalist, one network over all classes, trained on hard labels."""
from .stage import run, train_generalist

__all__ = ["run", "train_generalist"]
