"""The generalist's predictions kept sparse (ensemble/predictions.py): top-k with the rest's mass, in chunks."""
import pytest
import torch

from ensemble import predictions
from ensemble.predictions import prediction_matrix, read_split, sparsify, write_predictions


def _logits(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=g) * 3, torch.randint(classes, (n,), generator=g)


def test_top_k_keeps_the_largest_probabilities_and_the_mass_of_the_rest():
    logits, labels = _logits(50, 40)
    chunk = sparsify(logits, labels, 5)
    probs = logits.double().softmax(1)
    top = probs.topk(5, dim=1)
    assert torch.equal(chunk.ids, top.indices.int()) and chunk.logits is None
    torch.testing.assert_close(chunk.probs, top.values.float())
    torch.testing.assert_close(chunk.rest.double(), 1 - top.values.sum(1), rtol=1e-6, atol=1e-7)
    dense = sparsify(logits, labels, 20)  # k >= C/2: the dense form is smaller
    assert dense.ids is None and torch.equal(dense.logits, logits)
    torch.testing.assert_close(dense.probs, probs.float())
    assert torch.equal(dense.rest, torch.zeros(50))
    matrix = chunk.csr(40).toarray()
    for i in range(50):
        assert sorted(matrix[i].nonzero()[0].tolist()) == sorted(top.indices[i].tolist())


def test_chunks_are_written_in_files_of_fixed_size_and_read_back_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(predictions, "CHUNK_ROWS", 16)
    logits, labels = _logits(70, 30)
    parts = [sparsify(logits[i:i + 9], labels[i:i + 9], 4) for i in range(0, 70, 9)]  # batches of 9
    assert write_predictions(tmp_path, "val", parts) == 70
    assert [p.name for p in predictions.chunk_paths(tmp_path, "val")] == [f"val-{i:05d}.safetensors" for i in range(5)]
    whole = read_split(tmp_path, "val")
    expected = sparsify(logits, labels, 4)
    for name in ("probs", "ids", "rest", "labels"):
        assert torch.equal(getattr(whole, name), getattr(expected, name))
    matrix, y = prediction_matrix(tmp_path, "val", 30)
    assert matrix.shape == (70, 30) and matrix.nnz == 280 and (y == labels.numpy()).all()
    assert write_predictions(tmp_path, "val", [sparsify(logits[:20], labels[:20], 4)]) == 20  # a shorter rewrite
    assert len(predictions.chunk_paths(tmp_path, "val")) == 2 and len(read_split(tmp_path, "val").labels) == 20
    with pytest.raises(FileNotFoundError, match="holds no test predictions"):
        next(predictions.read_predictions(tmp_path, "test"))
