"""Stage 1: the generalist, one network over all classes."""
from .stage import load_generalist, run

__all__ = ["run", "load_generalist"]
