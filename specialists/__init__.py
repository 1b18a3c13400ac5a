"""Stage 3: specialists with dustbin classes and the launcher that trains them (inline or Ray); stage 4:
the combiner that merges them with the generalist, as a function (`combine`) and a classifier
(`Combiner`), and its evaluation."""
from .combine import active_specialists, combine, objective
from .combiner import Combiner
from .launch import run_tasks
from .model import correct_dustbin, dustbin_correction, specialist_net
from .stage import run
from .subsets import load_subsets
from .task import Job, train_specialist

__all__ = [
    "Combiner",
    "Job",
    "active_specialists",
    "combine",
    "correct_dustbin",
    "dustbin_correction",
    "load_subsets",
    "objective",
    "run",
    "run_tasks",
    "specialist_net",
    "train_specialist",
]
