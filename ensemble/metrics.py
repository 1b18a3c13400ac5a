"""The measures every stage reports: top-1, top-5 and NLL of a classifier, and the paper's conditional
top-1 on class subsets."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Top-1, top-5 accuracy and NLL (mean negative log-likelihood) of logits against labels."""
    return {f"{prefix}{k}": v / len(y) for k, v in classification_sums(logits, y).items()}


def classification_sums(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The examples right at top-1 and at top-5, and the summed NLL: what `classification_metrics`
    averages, to be added up batch by batch."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {
        "top1": int((top[:, 0] == y).sum()),
        "top5": int((top == y[:, None]).any(dim=1).sum()),
        "nll": F.cross_entropy(logits.float(), y, reduction="sum").item(),
    }


def conditional_top1(scores: torch.Tensor, labels: torch.Tensor, subsets: Sequence[torch.Tensor]) -> float:
    """Over the pairs (example, subset holding its true class): the share where the argmax of `scores`
    restricted to the subset's classes is the true class (NaN without such pairs). It tells how well a
    model separates the classes of a subset, whatever it says about the others: for a specialist, pass
    its local labels and `[arange(|S|)]`, the dustbin (local label |S|) being in no subset."""
    hits, pairs = conditional_counts(scores, labels, subsets)
    return hits / pairs if pairs else float("nan")


def conditional_counts(scores: torch.Tensor, labels: torch.Tensor, subsets: Sequence[torch.Tensor]) -> tuple[int, int]:
    """`conditional_top1`'s hits and pairs, to be added up batch by batch."""
    hits, pairs = 0, 0
    for s in subsets:
        inside = torch.isin(labels, s)
        hits += int((s[scores[inside][:, s].argmax(dim=1)] == labels[inside]).sum())
        pairs += int(inside.sum())
    return hits, pairs
