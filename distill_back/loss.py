"""The distillation loss: α·T²·KL(softmax(t/T) ‖ softmax(z/T)) + (1-α)·CE(y, z), per example.

T² keeps the soft term's gradient on the hard term's scale as T grows: the soft gradient in z is
T·(softmax(z/T) - softmax(t/T)), which tends to (z - t)/C for zero-mean logits (the paper, §2.1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

UNLABELLED = -1  # the label of a transfer example that has none: it gets the soft term only


def distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor | tuple[torch.Tensor, ...],
                      labels: torch.Tensor | None = None, *, temperature: float = 1.0,
                      alpha: float = 1.0) -> torch.Tensor:
    """Mean over the batch of α·T²·KL(p_T ‖ s_T) + (1-α)·CE(y, s), p_T = softmax(teacher/T),
    s_T = softmax(student/T). Without labels (None, or UNLABELLED rows) an example's loss is the soft
    term T²·KL alone. The teacher is its logits (B, C), or log-probabilities (log q*: softmax ignores a
    shift); or its top-k as (ids (B, k), log q (B, k), log_tail (B,)), log_tail = log Σ q_c^{1/T} over
    the classes not kept: then the KL is taken over the k kept classes and one tail bucket, the
    student's tail being its tempered mass outside the kept classes. With k = C (an empty tail,
    log_tail = -inf) that is the KL over every class."""
    check_distillation(temperature, alpha)
    t = temperature
    student = F.log_softmax(student_logits / t, dim=1)
    if isinstance(teacher, torch.Tensor):
        if student_logits.shape != teacher.shape:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher.shape)} differ: the student needs one output per class")
        soft = F.kl_div(student, F.log_softmax(teacher / t, dim=1), log_target=True, reduction="none").sum(dim=1)
    else:
        ids, log_q, log_tail = teacher
        ids = ids.long()
        buckets = F.log_softmax(torch.cat([log_q / t, log_tail[:, None].to(log_q.dtype)], dim=1), dim=1)
        tail = student.scatter(1, ids, -torch.inf).logsumexp(dim=1)  # the student's mass outside the kept classes
        mine = torch.cat([student.gather(1, ids), tail[:, None]], dim=1)
        soft = torch.where(buckets > -torch.inf, buckets.exp() * (buckets - mine), 0).sum(dim=1)
    soft = t * t * soft
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
