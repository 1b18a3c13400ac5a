"""Stage 5: the combiner. The solver of the paper's Eq. 5 (`combine`), the generalist and specialists of a
run as one classifier (`Combiner`), and the stage that evaluates the ensemble on the test set and gives
the verdict against the baselines."""
from .api import Combiner, combine_method, load_ensemble
from .solver import (
    active_outputs,
    active_specialists,
    combine,
    combine_active,
    objective,
)
from .stage import beats_generalist, run

__all__ = ["Combiner", "active_outputs", "active_specialists", "beats_generalist", "combine", "combine_active",
           "combine_method", "load_ensemble", "objective", "run"]
