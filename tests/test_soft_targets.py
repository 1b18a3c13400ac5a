"""Soft targets streamed to disk (distill_back/transfer.py): top-k with a tail bucket, resumable."""
import numpy as np
import pytest
import torch

from distill_back import distillation_loss
from distill_back.transfer import soft_targets


def _teacher(classes: int = 12, seed: int = 0):
    """A deterministic teacher: probabilities from a fixed random linear map of the images, and a log of
    the batches it was asked for."""
    w = torch.randn(16, classes, generator=torch.Generator().manual_seed(seed)) * 4
    asked = []

    def predict_proba(xb: torch.Tensor) -> torch.Tensor:
        asked.append(len(xb))
        return (xb.float().flatten(1) / 255 @ w).softmax(dim=1)

    return predict_proba, asked


def _images(n: int = 50) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_top_k_targets_keep_the_largest_and_temper_the_tail(tmp_path):
    predict_proba, _ = _teacher()
    x = _images()
    dense = soft_targets(tmp_path / "dense", "k", predict_proba, x, 16, None, 3.0)
    top = soft_targets(tmp_path / "top", "k", predict_proba, x, 16, 4, 3.0)
    assert top.log_q.shape == top.ids.shape == (50, 4) and top.log_tail.shape == (50,) and dense.ids is None
    expected = dense.log_q.topk(4, dim=1)
    torch.testing.assert_close(top.log_q, expected.values)
    assert torch.equal(top.ids.long(), expected.indices)
    tail = (dense.log_q / 3.0).scatter(1, expected.indices, -torch.inf).logsumexp(dim=1)
    torch.testing.assert_close(top.log_tail, tail)
    with_all = soft_targets(tmp_path / "all", "k", predict_proba, x, 16, 12, 3.0)  # k = C: the dense form
    assert with_all.ids is None and torch.equal(with_all.log_q, dense.log_q)


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (3.0, 0.9)])
def test_top_k_with_every_class_is_the_dense_loss(temperature, alpha):
    """The issue's check: k = C (ids a permutation of the classes, an empty tail) gives the dense loss
    and its gradient; with k < C the loss is the KL between the teacher's and the student's tempered
    masses on the kept classes and the tail bucket, by hand."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(7, 10, generator=g, dtype=torch.float64) * 3).requires_grad_()
    log_q = (torch.randn(7, 10, generator=g, dtype=torch.float64) * 3).log_softmax(dim=1)
    y = torch.randint(10, (7,), generator=g)
    top = log_q.topk(10, dim=1)
    empty = torch.full((7,), -torch.inf, dtype=torch.float64)
    dense = distillation_loss(z, log_q, y, temperature=temperature, alpha=alpha)
    (grad_dense,) = torch.autograd.grad(dense, z)
    sparse = distillation_loss(z, (top.indices, top.values, empty), y, temperature=temperature, alpha=alpha)
    (grad_sparse,) = torch.autograd.grad(sparse, z)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_sparse, grad_dense, rtol=1e-10, atol=1e-12)

    t, kept = temperature, log_q.topk(3, dim=1)
    tail = (log_q / t).scatter(1, kept.indices, -torch.inf).logsumexp(dim=1)
    loss = distillation_loss(z, (kept.indices, kept.values, tail), None, temperature=t)
    p, s = (log_q / t).softmax(1), (z / t).softmax(1)
    expected = []
    for i in range(7):
        inside = kept.indices[i].tolist()
        pk = [p[i, c] for c in inside] + [1 - sum(p[i, c] for c in inside)]
        sk = [s[i, c] for c in inside] + [1 - sum(s[i, c] for c in inside)]
        expected.append(t * t * sum(a * torch.log(a / b) for a, b in zip(pk, sk)))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-9, atol=1e-12)


def test_an_interrupted_run_goes_on_from_the_last_batch_written(tmp_path):
    predict_proba, asked = _teacher()
    x = _images()
    whole = soft_targets(tmp_path / "whole", "k", predict_proba, x, 16, 4, 2.0)
    asked.clear()

    def dies_on_the_third_batch(xb: torch.Tensor) -> torch.Tensor:
        if len(asked) == 2:
            raise KeyboardInterrupt
        return predict_proba(xb)

    with pytest.raises(KeyboardInterrupt):
        soft_targets(tmp_path / "cut", "k", dies_on_the_third_batch, x, 16, 4, 2.0)
    asked.clear()
    resumed = soft_targets(tmp_path / "cut", "k", predict_proba, x, 16, 4, 2.0)
    assert asked == [16, 2]  # rows 32..49 only: the first two batches were on disk
    for name in ("log_q", "ids", "log_tail"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name))
    asked.clear()
    soft_targets(tmp_path / "cut", "k", predict_proba, x, 16, 4, 2.0)
    assert asked == []  # finished: read, not made
    soft_targets(tmp_path / "cut", "another teacher", predict_proba, x, 16, 4, 2.0)
    assert sum(asked) == 50  # another key: made again
    assert np.load(tmp_path / "cut" / "ids.npy").shape == (50, 4)
