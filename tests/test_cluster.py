import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import cluster
from cluster.simulate import planted_predictions
from ensemble.cli import main
from ensemble.config import ClusterConfig, load_config
from ensemble.pipeline import run_pipeline
from ensemble.rundir import load_tensors


def _subsets(probs, seed=0, **settings):
    """The stage's steps on held-out probabilities (default settings otherwise): subsets, class vectors,
    centroids."""
    c = cluster.resolve(ClusterConfig(**settings), probs.shape[1])
    return cluster.find_subsets(cluster.covariance_matrix(probs, c.statistic, c.diagonal), c, seed)


# covariance


@pytest.mark.parametrize("diagonal", ["keep", "zero"])
def test_covariance_and_correlation_match_numpy(diagonal):
    x = np.random.default_rng(0).normal(size=(50, 6)) @ np.random.default_rng(1).normal(size=(6, 6))
    for statistic, expected in (("covariance", np.cov(x, rowvar=False)), ("correlation", np.corrcoef(x, rowvar=False))):
        if diagonal == "zero":
            np.fill_diagonal(expected, 0)
        got = cluster.covariance_matrix(x, statistic, diagonal)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    single = cluster.covariance_matrix(x.astype(np.float32))
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, np.cov(x, rowvar=False), rtol=1e-4, atol=1e-4)


def test_a_class_that_never_varies_gets_a_zero_row():
    x = np.random.default_rng(0).normal(size=(40, 4))
    x[:, 2] = 0.25
    corr = cluster.covariance_matrix(x, "correlation")
    assert not corr[2].any() and not corr[:, 2].any()
    keep = [0, 1, 3]
    np.testing.assert_allclose(corr[np.ix_(keep, keep)], np.corrcoef(x[:, keep], rowvar=False), rtol=1e-10)


def test_centred_logits_ignore_each_examples_offset():
    logits = np.random.default_rng(0).normal(size=(5, 4))
    shifted = logits + np.arange(5)[:, None] * 10.0
    np.testing.assert_allclose(cluster.centred_logits(shifted), cluster.centred_logits(logits), atol=1e-12)
    np.testing.assert_allclose(cluster.centred_logits(logits).mean(axis=1), 0, atol=1e-12)


def test_unit_rows():
    m = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(cluster.unit_rows(m), [[0.6, 0.8], [0.0, 0.0]])


# subsets


def test_overlapping_subsets_hold_exactly_s_nearest_classes():
    vectors = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [100.0]])
    subsets = cluster.overlapping(vectors, np.array([[0.0], [3.0]]), size=3)
    assert [s.tolist() for s in subsets] == [[0, 1, 2], [2, 3, 4]]
    assert cluster.coverage(subsets, 6).tolist() == [1, 1, 2, 1, 1, 0]  # class 2 in two subsets, class 5 in none
    assignment = cluster.single_assignment(vectors, np.array([[0.0], [3.0]]), subsets)
    assert assignment.tolist() == [0, 0, 1, 1, 1, -1]  # class 2 goes to the nearer centroid (3 is 1 away, 0 is 2)


def test_overlapping_on_planted_groups():
    probs, labels, groups = planted_predictions(60, 10, 10, seed=0)
    subsets, vectors, centroids = _subsets(probs, num_subsets=6, shape="overlapping", subset_size=12)
    assert [len(s) for s in subsets] == [12] * 6
    counts = cluster.coverage(subsets, 60)
    assert counts.sum() == 72 and counts.max() >= 2  # 12 extra slots: some classes are held twice
    assignment = cluster.single_assignment(vectors, centroids, subsets)
    assert adjusted_rand_score(groups, assignment) == pytest.approx(1.0)


def test_classes_that_never_vary_join_no_overlapping_subset():
    """Issue 25's 100,000-class run: two classes the held-out predictions never gave any mass (zero
    vectors) sat nearer to every centroid than the real classes, so they were in 314 of 316 subsets,
    and an image the generalist gave one of them activated 314 specialists."""
    probs, _, groups = planted_predictions(60, 10, 10, seed=0)
    probs = np.concatenate([probs, np.zeros((len(probs), 3))], axis=1)  # classes 60, 61, 62: never predicted
    subsets, vectors, centroids = _subsets(probs, num_subsets=6, shape="overlapping", subset_size=12)
    assert [len(s) for s in subsets] == [12] * 6
    assert cluster.coverage(subsets, 63)[60:].tolist() == [0, 0, 0]
    assert adjusted_rand_score(groups, cluster.single_assignment(vectors, centroids, subsets)[:60]) == pytest.approx(1.0)
    unguarded = cluster.overlapping(vectors, centroids, 12)  # what the stage did before
    assert cluster.coverage(unguarded, 63)[60:].tolist() == [6, 6, 6]


@pytest.mark.parametrize("seed", range(4))
def test_partition_respects_the_size_bounds(seed):
    rng = np.random.default_rng(seed)
    blobs = np.repeat(np.arange(5), [40, 3, 3, 2, 2])  # one big blob, four tiny ones: 50 classes
    vectors = rng.normal(size=(5, 8))[blobs] * 5 + rng.normal(size=(50, 8))
    centroids = cluster.fit_kmeans(vectors, 5, seed=seed)
    subsets, new_centroids = cluster.partition(vectors, centroids, min_size=6, max_size=14)
    assert sorted(np.concatenate(subsets).tolist()) == list(range(50))  # a partition of every class
    assert all(6 <= len(s) <= 14 for s in subsets) and new_centroids.shape == (5, 8)


def test_bounded_assignment_spills_over_and_fills_up():
    d = np.array([[0.0, 5, 9], [1, 5, 9], [2, 3, 9], [3, 6, 9], [4, 8, 9]])  # every class prefers subset 0
    labels = cluster.bounded_assignment(d, min_size=1, max_size=2)
    assert labels.tolist() == [0, 0, 1, 1, 2]  # the two nearest keep 0; the rest go to their next choice
    assert cluster.bounded_assignment(d, min_size=0, max_size=5).tolist() == [0] * 5
    # min_size=1: subsets 1 and 2 take the classes cheapest to move, d[c, new] - d[c, 0]
    assert cluster.bounded_assignment(d, min_size=1, max_size=5).tolist() == [0, 0, 1, 0, 2]


def test_partition_keeps_kmeans_clusters_that_fit_and_recovers_planted_groups():
    probs, labels, groups = planted_predictions(60, 10, 10, seed=0)
    subsets, vectors, centroids = _subsets(probs, num_subsets=6, min_size=5, max_size=20)
    assignment = cluster.single_assignment(vectors, centroids, subsets)
    assert adjusted_rand_score(groups, assignment) == pytest.approx(1.0)
    capture = cluster.confusion_capture(cluster.soft_confusion(probs, labels, 60), subsets)
    random, _ = cluster.random_capture(cluster.soft_confusion(probs, labels, 60), [10] * 6, True, 10, 0)
    assert capture > 0.6 and capture > 4 * random


def test_same_seed_same_subsets():
    probs, _, _ = planted_predictions(80, 8, 4, noise=2.0, seed=3)  # noisy: K-means has choices to make
    for shape in ("partition", "overlapping"):
        a = _subsets(probs, seed=5, num_subsets=7, shape=shape, subset_size=15)[0]
        b = _subsets(probs, seed=5, num_subsets=7, shape=shape, subset_size=15)[0]
        assert [s.tolist() for s in a] == [s.tolist() for s in b]


# report


def test_soft_confusion_and_capture_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.1, 0.6, 0.3], [0.0, 0.4, 0.6]])
    labels = np.array([0, 0, 1, 2])
    confusion = cluster.soft_confusion(probs, labels, 3)
    np.testing.assert_allclose(confusion.toarray(), [[1.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.0, 0.4, 0.6]])
    off = 0.7 + 0.1 + 0.1 + 0.3 + 0.0 + 0.4  # 1.6
    assert cluster.confusion_capture(confusion, [np.array([0, 1]), np.array([2])]) == pytest.approx(0.8 / off)
    assert cluster.confusion_capture(confusion, [np.array([0, 1]), np.array([1, 2])]) == pytest.approx(1.5 / off)
    assert cluster.confusion_capture(confusion, [np.array([0, 1, 2])]) == pytest.approx(1.0)
    assert np.isnan(cluster.confusion_capture(np.eye(3), [np.array([0, 1])]))


def test_random_capture_of_uniform_confusion_is_the_share_of_pairs_together():
    confusion = np.ones((12, 12))
    sizes = [6, 4, 2]
    mean, std = cluster.random_capture(confusion, sizes, disjoint=True, draws=5, seed=0)
    assert mean == pytest.approx(sum(s * (s - 1) for s in sizes) / (12 * 11)) and std == pytest.approx(0)
    assert cluster.random_capture(confusion, sizes, False, 5, 1) == cluster.random_capture(confusion, sizes, False, 5, 1)


def test_group_agreement_counts_covered_classes_only():
    groups = np.array([0, 0, 1, 1, 2])
    subsets = [np.array([0, 1]), np.array([2, 3])]
    got = cluster.group_agreement(np.array([0, 0, 1, 1, -1]), groups, subsets)
    assert got["classes_compared"] == 4 and got["ari"] == pytest.approx(1.0) and got["nmi"] == pytest.approx(1.0)
    assert got["group_pairs_together"] == pytest.approx(1.0)


def test_auto_sizes_follow_the_number_of_classes():
    c = cluster.resolve(ClusterConfig(), 400)
    assert (c.num_subsets, c.min_size, c.max_size, c.subset_size) == (20, 5, 60, 30)
    c = cluster.resolve(ClusterConfig(num_subsets=50, min_size=2), 400)
    assert (c.num_subsets, c.min_size, c.max_size) == (50, 2, 24)


# bad input


@pytest.mark.parametrize("call, message", [
    (lambda v, c: cluster.fit_kmeans(v, 13), "cannot make 13 subsets of 12 classes"),
    (lambda v, c: cluster.overlapping(v, c, 13), "cannot make subsets of 13 classes out of 12"),
    (lambda v, c: cluster.partition(v, c, 5, 8), r"need min_size \* M <= classes <= max_size \* M \(15 <= 12"),
    (lambda v, c: cluster.partition(v, c, 1, 3), r"\(3 <= 12 <= 9 is false\)"),
    (lambda v, c: cluster.partition(v, c, 4, 3), "need 1 <= min_size <= max_size"),
    (lambda v, c: cluster.class_vectors(np.eye(12), pca_components=20), "cannot keep 20 principal components"),
])
def test_impossible_settings_are_clear_errors(call, message):
    vectors = np.random.default_rng(0).normal(size=(12, 4))
    with pytest.raises(ValueError, match=message):
        call(vectors, vectors[:3])


@pytest.mark.parametrize("x, message", [
    (np.array([[0.5, np.nan], [0.5, 0.5]]), "holds 1 NaN or infinite values"),
    (np.ones(4), "must be 2-D"),
    (np.ones((3, 2, 2)), "must be 2-D"),
    (np.ones((5, 3)), "has 3 columns but the data set has 2 classes"),
    (np.ones((1, 2)), "at least 2"),
])
def test_bad_predictions_are_clear_errors(x, message):
    with pytest.raises(ValueError, match=message):
        cluster.check_predictions(x, 2, "val_probs")


def test_constant_predictions_are_a_clear_error():
    with pytest.raises(ValueError, match="all zero"):
        cluster.covariance_matrix(np.tile(np.float32([0.2, 0.3, 0.5]), (10, 1)))
    one_varies = np.tile([0.2, 0.3, 0.5], (10, 1))
    one_varies[::2, 0] = 0.9  # only class 0 varies: nothing is predicted together
    with pytest.raises(ValueError, match="zero off the diagonal"):
        cluster.covariance_matrix(one_varies, diagonal="zero")


# the stage


def _cfg(tmp_path, *extra):
    return load_config(None, [
        "data.source=synthetic", "data.num_classes=40", "data.group_size=5", "data.train_per_class=30",
        "data.test_per_class=2", "data.image_size=12", "generalist.net.name=mlp", "generalist.net.width=32",
        "generalist.train.epochs=2", "cluster.shape=partition", "cluster.num_subsets=5", "cluster.n_init=2",
        "specialists.train.epochs=1",
        "distill_back.train.epochs=1", "launch.backend=inline", f"runs_dir={tmp_path}", "name=r",
        *extra])


def test_stage_writes_subsets_skips_when_done_and_reruns_alone_when_its_config_changes(tmp_path, capsys):
    summary = run_pipeline(_cfg(tmp_path))["cluster"]
    folder = tmp_path / "r" / "cluster"
    assert {p.name for p in folder.iterdir()} == {"subsets.json", "covariance.safetensors", "report.json",
                                                  "covariance.png", "coverage.png", ".stage.json"}
    subsets = json.loads((folder / "subsets.json").read_text())
    classes = [c for s in subsets["subsets"] for c in s["classes"]]
    assert len(subsets["subsets"]) == 5 and sorted(classes) == list(range(40)) and subsets["uncovered"] == []
    assert subsets["subsets"][0]["names"][0] == f"c{subsets['subsets'][0]['classes'][0]:05d}"
    assert subsets["settings"]["min_size"] == 2 and subsets["settings"]["seed"] == 0  # auto sizes resolved
    report = json.loads((folder / "report.json").read_text())
    assert report["coverage_histogram"] == {"0": 0, "1": 40} and report["groups"]["num_groups"] == 8
    assert summary["confusion_capture"] == report["confusion_capture"]
    assert all((folder / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in ("covariance.png", "coverage.png"))

    generalist_mtime = (tmp_path / "r" / "generalist" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    run_pipeline(_cfg(tmp_path))
    assert capsys.readouterr().out.count("done already") == 6  # every stage

    run_pipeline(_cfg(tmp_path, "cluster.shape=overlapping", "cluster.subset_size=12"))
    out = capsys.readouterr().out
    assert "[generalist] done already" in out and "[cluster] running" in out
    assert (tmp_path / "r" / "generalist" / "model.safetensors").stat().st_mtime_ns == generalist_mtime
    subsets = json.loads((folder / "subsets.json").read_text())
    assert [len(s["classes"]) for s in subsets["subsets"]] == [12] * 5

    assert main(["status", str(tmp_path / "r")]) == 0
    assert "subsets: 5 (overlapping), sizes 12 to 12" in capsys.readouterr().out


def test_stage_with_impossible_settings_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="cannot make 50 subsets of 40 classes"):
        run_pipeline(_cfg(tmp_path, "cluster.num_subsets=50"))


# sparse predictions (issue 25)


def _top_k(probs: np.ndarray, k: int):
    """The sparse top-k rows of `probs`, as the generalist stage keeps them."""
    from ensemble.predictions import sparsify
    import torch
    chunk = sparsify(torch.from_numpy(probs).double().log(), torch.zeros(len(probs), dtype=torch.long), k)
    return chunk.csr(probs.shape[1])


@pytest.mark.parametrize("statistic, diagonal", [("covariance", "keep"), ("correlation", "zero")])
def test_the_sparse_covariance_equals_the_dense_one(statistic, diagonal):
    """With every class kept (k = C) the covariance accumulated from sparse rows (raw moments) is the
    dense one (centred columns); with k < C it is the dense covariance of the kept entries (0 elsewhere);
    the operator gives the same matrix's products without forming it."""
    from scipy import sparse
    probs, _, _ = planted_predictions(30, 5, 4, seed=1)
    probs = probs.astype(np.float64)
    full = sparse.csr_matrix(probs)
    np.testing.assert_allclose(cluster.covariance_matrix(full, statistic, diagonal),
                               cluster.covariance_matrix(probs, statistic, diagonal), rtol=1e-9, atol=1e-12)
    kept = _top_k(probs, 4)
    dense_kept = kept.toarray()
    assert (np.count_nonzero(dense_kept, axis=1) == 4).all()
    expected = cluster.covariance_matrix(dense_kept, statistic, diagonal)
    np.testing.assert_allclose(cluster.covariance_matrix(kept, statistic, diagonal), expected, rtol=1e-9, atol=1e-12)
    v = np.random.default_rng(0).normal(size=(30, 7))
    np.testing.assert_allclose(cluster.covariance_operator(kept, statistic, diagonal)(v), expected @ v,
                               rtol=1e-9, atol=1e-12)


def test_embedded_columns_keep_the_columns_distances_and_give_the_same_subsets():
    """embed with dims = C is exact: distances between the embedded rows are those between the matrix's
    columns, and the stage's K-means finds the same subsets on them; a few dimensions (the planted
    groups' number) already do."""
    probs, _, _ = planted_predictions(60, 10, 10, seed=0)
    x = _top_k(probs, 30)  # every class: the planted groups come out exactly
    matrix = cluster.covariance_matrix(x, "correlation")
    rows, values = cluster.embed(cluster.covariance_operator(x, "correlation"), 60, 60, seed=0)
    np.testing.assert_allclose(rows @ rows.T, matrix @ matrix.T, rtol=1e-8, atol=1e-10)  # the same distances
    np.testing.assert_allclose(np.sort(np.abs(values)), np.sort(np.abs(np.linalg.eigvalsh(matrix))), atol=1e-10)
    for c in (ClusterConfig(shape="partition", num_subsets=6, min_size=5, max_size=20),
              ClusterConfig(num_subsets=6, subset_size=10)):
        c = cluster.resolve(c, 60)
        dense = cluster.find_subsets(matrix, c, seed=0)[0]
        assert sorted(s.tolist() for s in dense) == [list(range(g, g + 10)) for g in range(0, 60, 10)]
        for dims in (60, 8):
            embedded = cluster.find_subsets(cluster.embed(cluster.covariance_operator(x, "correlation"), 60, dims, 0)[0],
                                            c, seed=0)[0]
            assert sorted(s.tolist() for s in embedded) == sorted(s.tolist() for s in dense)
    with pytest.raises(ValueError, match="cluster.embedding must be between 1 and 60"):
        cluster.embed(cluster.covariance_operator(x), 60, 61, seed=0)


def test_the_report_from_sparse_rows_is_the_report_of_the_kept_entries():
    """Confusion capture and group agreement from sparse top-k rows equal the dense computation on the
    same (kept) entries; group agreement counts same-group pairs without a C×C matrix."""
    probs, labels, groups = planted_predictions(40, 8, 5, seed=2)
    subsets = [np.arange(0, 12), np.arange(8, 20), np.arange(20, 36)]
    x = _top_k(probs, 6)
    capture = cluster.confusion_capture(cluster.soft_confusion(x, labels, 40), subsets)
    dense = cluster.soft_confusion(x.toarray(), labels, 40).toarray()
    together = np.zeros((40, 40), dtype=bool)
    for s in subsets:
        together[np.ix_(s, s)] = True
    off = ~np.eye(40, dtype=bool)
    assert capture == pytest.approx(dense[together & off].sum() / dense[off].sum())
    assignment = np.repeat([0, 1, 2, -1], [8, 12, 16, 4])
    agreement = cluster.group_agreement(assignment, groups, subsets)
    same = (groups[:, None] == groups[None, :]) & off
    assert agreement["group_pairs_together"] == pytest.approx((same & together).sum() / same.sum())


def test_top_k_predictions_and_an_embedding_through_the_stage(tmp_path):
    """generalist.top_k below C/2 keeps sparse predictions; cluster.embedding clusters the embedded
    columns (as above 4,096 classes): embedding.safetensors instead of the C×C matrix, the plot of a block;
    the embedded columns are as far apart as the C×C matrix's of the same predictions (equal
    subsets are not asserted: this 2-epoch generalist's classes sit at near-equal distances, where
    rounding decides K-means' ties differently across CPUs)."""
    for stage in ("generalist", "cluster"):
        run_pipeline(_cfg(tmp_path, "generalist.top_k=6", "cluster.embedding=40"), stage)
    folder = tmp_path / "r" / "cluster"
    assert {p.name for p in folder.iterdir()} >= {"subsets.json", "embedding.safetensors", "covariance.png"}
    assert not (folder / "covariance.safetensors").exists()
    from ensemble.predictions import read_split
    val = read_split(tmp_path / "r" / "generalist" / "predictions", "val")
    assert val.probs.shape[1] == 6 and val.ids.shape == val.probs.shape and val.logits is None
    embedded = json.loads((folder / "subsets.json").read_text())
    assert embedded["settings"]["embedding_dims"] == 40
    columns = load_tensors(folder / "embedding.safetensors")["columns"].numpy()
    run_pipeline(_cfg(tmp_path, "generalist.top_k=6"), "cluster")
    assert (folder / "covariance.safetensors").exists() and not (folder / "embedding.safetensors").exists()
    matrix = load_tensors(folder / "covariance.safetensors")["matrix"].numpy()
    np.testing.assert_allclose(columns @ columns.T, matrix @ matrix.T, rtol=1e-8, atol=1e-10)  # the same distances
    with pytest.raises(ValueError, match="cluster.inputs=logits needs .* set generalist.top_k=null"):
        run_pipeline(_cfg(tmp_path, "generalist.top_k=6", "cluster.inputs=logits"))  # before any stage runs
