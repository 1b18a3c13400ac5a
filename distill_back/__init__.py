"""Stage 6: the ensemble distilled back into one network, and the distillation loss."""
from .loss import distillation_loss
from .stage import check, run

__all__ = ["check", "distillation_loss", "run"]
