"""Stage 5: the ensemble distilled back into one network, and the distillation loss."""
from .loss import distillation_loss
from .stage import check, make_student, run

__all__ = ["check", "distillation_loss", "make_student", "run"]
