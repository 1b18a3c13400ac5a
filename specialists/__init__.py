"""Stage 3: one specialist per class subset, its classes plus a dustbin, started from the generalist and
trained in parallel by the launcher (inline or Ray tasks)."""
from .branches import (active_shares, branch_costs, ensemble_multiply_adds, ensemble_parameters, front_macs, own_net,
                       shared_blocks)
from .heads import DustbinHead, FullSoftmaxHead, make_head, widen
from .stage import Specialists, check, load_specialists, run
from .subsets import load_subsets
from .task import Job, Trained, train_specialist

__all__ = [
    "DustbinHead",
    "FullSoftmaxHead",
    "Job",
    "Specialists",
    "Trained",
    "active_shares",
    "branch_costs",
    "ensemble_multiply_adds",
    "ensemble_parameters",
    "front_macs",
    "check",
    "load_specialists",
    "load_subsets",
    "make_head",
    "own_net",
    "run",
    "shared_blocks",
    "train_specialist",
    "widen",
]
