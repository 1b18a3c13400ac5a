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
    _, hit = conditional_hits(scores, labels, subsets)
    return int(hit.sum()), len(hit)


def conditional_hits(scores: torch.Tensor, labels: torch.Tensor, subsets: Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every pair (example b, subset m holding b's true class): m, and whether the argmax of
    scores[b] over subset m's classes (the first in m's order on a tie) is the true class. All pairs at
    once: the subsets as one sorted id list looked up at the labels, then a (pairs × largest subset)
    gather; never examples × subsets."""
    device = scores.device
    sizes = torch.tensor([len(s) for s in subsets], dtype=torch.long, device=device)
    if not int(sizes.sum()):
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.bool, device=device)
    labels = labels.to(device)
    ids = torch.cat([torch.as_tensor(s, device=device).long() for s in subsets])
    owner = torch.repeat_interleave(torch.arange(len(subsets), device=device), sizes)
    ids_sorted, order = ids.sort(stable=True)
    first = torch.searchsorted(ids_sorted, labels)
    count = torch.searchsorted(ids_sorted, labels, right=True) - first  # subsets holding each label
    example = torch.repeat_interleave(torch.arange(len(labels), device=device), count)
    offset = torch.arange(len(example), device=device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    m = owner[order[torch.repeat_interleave(first, count) + offset]]
    valid = torch.arange(int(sizes.max()), device=device) < sizes[:, None]  # (M, largest subset)
    table = torch.zeros(valid.shape, dtype=torch.long, device=device)
    table[valid] = ids
    candidates = table[m]
    restricted = scores[example[:, None], candidates].masked_fill(~valid[m], -torch.inf)
    return m, candidates.gather(1, restricted.argmax(dim=1, keepdim=True))[:, 0] == labels[example]


def active_table(p_general: torch.Tensor, ids: Sequence[torch.Tensor], top_n: int | None) -> torch.Tensor:
    """(M, B) 1.0 where specialist m is active for example b: S_m meets p^g_b's top_n classes (p_general
    may be the logits: the same top classes). The rule of the Combiner, and of the baselines stage that
    sizes a rival at the ensemble's inference cost.
    A (C, M) membership table looked up at the top classes: (B, top_n, M), never B×M×C."""
    num_examples, num_classes = p_general.shape
    if top_n is None:
        return p_general.new_ones(len(ids), num_examples)
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"top_n must be an integer >= 1 or None, got {top_n!r}")
    member = torch.zeros(num_classes, len(ids), dtype=torch.bool, device=p_general.device)
    for m, s in enumerate(ids):
        member[s, m] = True
    top = p_general.argmax(dim=1, keepdim=True) if top_n == 1 else p_general.topk(min(top_n, num_classes), dim=1).indices
    return member[top].any(dim=1).t().to(p_general.dtype)
