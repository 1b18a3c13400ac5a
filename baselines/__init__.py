"""Stage 4: the rivals the ensemble must beat, the generalist's net trained from scratch for the
ensemble's training compute and for its wall clock."""
from .stage import (TITLES, baseline_rows, budgets, check, epoch_examples, examples, load_baseline, run,
                    train_baseline, training_compute, training_examples)

__all__ = ["TITLES", "baseline_rows", "budgets", "check", "epoch_examples", "examples", "load_baseline", "run",
           "train_baseline", "training_compute", "training_examples"]
