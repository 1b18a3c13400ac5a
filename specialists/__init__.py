"""Stage 3: one specialist per class subset, its classes plus a dustbin, started from the generalist and
trained in parallel by the launcher (inline or Ray tasks)."""
from .heads import DustbinHead, FullSoftmaxHead, make_head
from .stage import Specialists, check, load_specialists, run
from .subsets import load_subsets
from .task import Job, Trained, train_specialist

__all__ = [
    "DustbinHead",
    "FullSoftmaxHead",
    "Job",
    "Specialists",
    "Trained",
    "check",
    "load_specialists",
    "load_subsets",
    "make_head",
    "run",
    "train_specialist",
]
