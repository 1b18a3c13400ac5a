"""The distillation loss: α·T²·KL(softmax(t/T) ‖ softmax(z/T)) + (1-α)·CE(y, z), per example.

T² keeps the soft term's gradient on the hard term's scale as T grows: the soft gradient in z is
T·(softmax(z/T) - softmax(t/T)), which tends to (z - t)/C for zero-mean logits (the paper, §2.1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

UNLABELLED = -1  # the label of a transfer example that has none: it gets the soft term only


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      *, temperature: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """Mean over the batch of α·T²·KL(p_T ‖ s_T) + (1-α)·CE(y, s), p_T = softmax(teacher/T),
    s_T = softmax(student/T). Without labels (None, or UNLABELLED rows) an example's loss is the soft
    term T²·KL alone. teacher_logits may be log-probabilities (log q*): softmax ignores a shift."""
    check_distillation(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the student needs one output per class")
    t = temperature
    soft = t * t * F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                            log_target=True, reduction="none").sum(dim=1)
    if labels is None:
        return soft.mean()
    labelled = labels != UNLABELLED
    hard = F.cross_entropy(student_logits, labels.clamp_min(0), reduction="none")
    loss = torch.where(labelled, alpha * soft + (1 - alpha) * hard, soft)
    return loss.mean()


def check_distillation(temperature: float, alpha: float) -> None:
    """A clear error for a temperature that is not positive or an α outside [0, 1]."""
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"distillation alpha (the soft term's weight) must be in [0, 1], got {alpha}")
