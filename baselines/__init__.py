"""Stage 4: the rivals the ensemble must beat, the generalist's net trained from scratch for the
ensemble's training compute and for its wall clock, and widened to its inference cost."""
from .stage import (TITLES, baseline_rows, baseline_title, budgets, check, epoch_examples, examples, load_baseline, run,
                    train_baseline, trained_budgets, training_compute, training_examples)

__all__ = ["TITLES", "baseline_rows", "baseline_title", "budgets", "check", "epoch_examples", "examples", "load_baseline", "run",
           "train_baseline", "trained_budgets", "training_compute", "training_examples"]
