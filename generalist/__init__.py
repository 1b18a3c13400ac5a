"""Stage 1: the generalist, one network over all classes, trained on hard labels or imported."""
from .stage import check, import_generalist, run, train_generalist

__all__ = ["check", "import_generalist", "run", "train_generalist"]
