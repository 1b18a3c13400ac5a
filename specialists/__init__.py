"""Stage 3: specialists with dustbin classes, the launcher that trains them (inline or Ray), and the
combiner that merges them with the generalist."""
from .launch import run_tasks
from .model import correct_dustbin, dustbin_correction, specialist_net
from .stage import run
from .subsets import load_subsets
from .task import Job, train_specialist

__all__ = [
           "Job",
           "correct_dustbin",
           "dustbin_correction",
           "load_subsets",
           "run",
           "run_tasks",
           "specialist_net",
           "train_specialist",
]
