"""The Combiner API and the evaluation stage, on a tiny run whose specialists are trained."""
import json

import pytest
import torch
from conftest import specialists_run

from combiner import Combiner, active_outputs, combine, combine_method, load_ensemble
from combiner.stage import (
    average_combine,
    compare,
    evaluate_systems,
    expand,
    lowest_dustbin_combine,
)
from ensemble.data import load_data
from ensemble.metrics import conditional_counts, conditional_top1
from ensemble.pipeline import run_pipeline
from ensemble.predictions import read_split
from ensemble.rundir import load_tensors
from ensemble.train import predict_logits


@pytest.fixture(scope="module")
def trained(upstream, tmp_path_factory):
    """A copy of the tiny upstream run with its specialists and evaluation done."""
    root = tmp_path_factory.mktemp("trained")
    cfg = specialists_run(upstream, root)
    run_pipeline(cfg)
    return cfg


def test_combiner_runs_only_the_specialists_an_example_needs(trained):
    run = trained.run_dir
    x = load_data(trained.data).x_test
    ensemble = Combiner.from_run(run)
    seen = [0] * len(ensemble.specialists)
    for m, net in enumerate(ensemble.specialists):
        net.register_forward_hook(lambda mod, args, out, m=m: seen.__setitem__(m, seen[m] + len(args[0])))
    q = ensemble.predict_proba(x)
    needed = list(seen)

    # the reference: every specialist on every example, then the functional core
    loaded = load_ensemble(run, trained)
    generalist, specialists, subsets = loaded.generalist, loaded.specialists, loaded.subsets
    p_general = predict_logits(generalist, x, device=torch.device("cpu")).softmax(1)
    probs = [predict_logits(net, x, device=torch.device("cpu")).softmax(1) for net in specialists]
    expected = combine(p_general, probs, subsets, top_n=1, method=trained.combine.method)  # the run's combiner
    assert torch.allclose(q, expected, atol=1e-5)
    assert torch.equal(ensemble.predict(x), q.argmax(1))
    top = p_general.argmax(1)
    assert needed == [int(torch.isin(top, torch.tensor(s)).sum()) for s in subsets]  # only the active examples

    everyone = Combiner.from_run(run, top_n=None).predict_proba(x[:50])
    assert torch.allclose(everyone, combine(p_general[:50], [p[:50] for p in probs], subsets, top_n=None,
                                            method=trained.combine.method), atol=1e-5)
    kl = Combiner.from_run(run, method="fixed_point").predict_proba(x[:50])
    assert torch.allclose(kl, combine(p_general[:50], [p[:50] for p in probs], subsets, top_n=1), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        Combiner.from_run(run / "nothing")


def test_evaluation_tables_match_a_slow_recount(trained):
    report = json.loads((trained.run_dir / "combiner" / "eval.json").read_text())
    preds = read_split(trained.run_dir / "generalist" / "predictions", "test")
    labels = preds.labels
    assert [r["system"] for r in report["table3"]] == [  # the configured combiner (the default) first
        "generalist", "within-subset combiner, top_n=1", "within-subset combiner, top_n=2",
        "within-subset combiner, top_n=5", "average, top_n=1", "lowest dustbin, top_n=1", "KL combiner, top_n=1"]
    general = report["table3"][0]
    assert general["test_top1"] == pytest.approx((preds.probs.argmax(1) == labels).float().mean().item())
    subsets = json.loads((trained.run_dir / "specialists" / "subsets.json").read_text())["subsets"]
    pairs = [(p, y, s["classes"]) for p, y in zip(preds.probs.tolist(), labels.tolist())
             for s in subsets if y in s["classes"]]
    hits = sum(max(s, key=lambda c: p[c]) == y for p, y, s in pairs)
    assert general["conditional_top1"] == pytest.approx(hits / len(pairs))
    for name, rows in report["table4"].items():
        assert sum(r["test_examples"] for r in rows) == len(labels)
        combined = next(r for r in report["table3"] if r["system"] == name)
        delta = sum(r["delta_correct"] for r in rows)
        assert combined["test_top1"] - general["test_top1"] == pytest.approx(delta / len(labels))
    assert (trained.run_dir / "combiner" / "table4.png").stat().st_size > 5_000
    assert "Table 3" in (trained.run_dir / "combiner" / "tables.md").read_text()


def test_verdict_compares_the_ensemble_with_each_baseline_on_the_same_images(trained):
    """eval.json's verdict rows recount from the saved predictions; the ensemble pays only if it beats all
    three rivals (equal compute, wall clock and inference cost)."""
    run = trained.run_dir
    report = json.loads((run / "combiner" / "eval.json").read_text())
    labels = read_split(run / "generalist" / "predictions", "test").labels
    x = load_data(trained.data).x_test
    right = Combiner.from_run(run).predict(x) == labels
    rows = report["comparisons"]
    rivals = [r["rival"] for r in rows]
    assert rivals[0] == "generalist" and rivals[-1].startswith("equal-compute generalist")
    assert sorted(r.split(" (")[0] for r in rivals[1:]) == [
        "equal-compute generalist", "equal-inference-cost generalist", "equal-wall-clock generalist"]
    for budget, row in (("compute", rows[-1]), ("inference", next(r for r in rows if "inference" in r["rival"]))):
        pred = load_tensors(run / "baselines" / budget / "predictions.safetensors")["test_pred"]
        assert (row["won"], row["lost"]) == (int((right & (pred != labels)).sum()),
                                             int((~right & (pred == labels)).sum()))
    unbeaten = [r for r in rows[1:] if r["call"] != "beats"]
    deciding = min(unbeaten or rows[1:], key=lambda r: r["difference"])
    assert (report["verdict"], report["verdict_rival"]) == (deciding["call"], deciding["rival"])
    text = (run / "combiner" / "tables.md").read_text()
    assert "Verdict" in text and ("The ensemble pays" in text) == (not unbeaten)


def test_the_ensemble_pays_only_if_it_beats_every_rival():
    from combiner.stage import decisive, verdict_markdown

    def row(rival, difference, call):
        return {"rival": rival, "rival_top1": 0.5, "difference": difference, "standard_error": 0.01, "won": 1,
                "lost": 0, "call": call}

    rows = [row("generalist", 0.05, "beats"), row("a", 0.03, "beats"), row("b", 0.01, "is level with"),
            row("c", 0.04, "beats")]
    assert decisive(rows)["rival"] == "b"
    assert "does not pay: it is level with the b" in verdict_markdown(rows)
    rows[2] = row("b", 0.035, "beats")
    assert decisive(rows)["rival"] == "a"
    assert "The ensemble pays: it beats all 3 single networks" in verdict_markdown(rows)
    rows[1] = row("a", -0.04, "loses to")
    assert decisive(rows)["rival"] == "a" and "does not pay: it loses to the a" in verdict_markdown(rows)


@pytest.mark.parametrize("won, lost, call", [(30, 5, "beats"), (5, 30, "loses to"), (12, 8, "is level with"), (0, 0, "is level with")])
def test_compare_gives_the_paired_difference_its_standard_error_and_the_call(won, lost, call):
    n = 1000
    right = torch.zeros(n, dtype=torch.bool)
    rival = torch.zeros(n, dtype=torch.bool)
    right[:won] = True  # the ensemble alone right
    rival[won:won + lost] = True  # the rival alone right
    right[500:700] = rival[500:700] = True  # both right
    row, = compare(right, {"rival": (rival, rival.float().mean().item())})
    d = right.double() - rival.double()  # the slow reference: the per-image difference's mean and its s.e.
    assert row["difference"] == pytest.approx(d.mean().item())
    assert row["standard_error"] == pytest.approx((d.var(unbiased=False) / n).sqrt().item())
    assert (row["won"], row["lost"], row["call"]) == (won, lost, call)


def test_without_baselines_the_verdict_says_it_cannot_tell(upstream, tmp_path):
    cfg = specialists_run(upstream, tmp_path, "baselines.budgets=[]")
    run_pipeline(cfg, only="specialists")
    run_pipeline(cfg, only="baselines")
    run_pipeline(cfg, only="combiner")
    report = json.loads((cfg.run_dir / "combiner" / "eval.json").read_text())
    assert report["verdict_rival"] == "generalist"
    assert "No baselines were trained" in (cfg.run_dir / "combiner" / "tables.md").read_text()
    assert not (cfg.run_dir / "baselines" / "compute").exists()


def test_auto_combiner_is_the_one_with_the_higher_validation_top1(trained, tmp_path):
    """combine.method=auto: the combiner stage picks the KL or the within-subset combiner on the validation
    set, records both scores, and the run's Combiner (and so distill_back) uses its pick."""
    import shutil

    from conftest import SPECIALISTS_TINY

    from combiner.stage import AUTO
    from ensemble.config import load_config

    shutil.copytree(trained.run_dir, tmp_path / "r", ignore=shutil.ignore_patterns("combiner", "distill_back"))
    cfg = load_config(None, [*SPECIALISTS_TINY, f"runs_dir={tmp_path}", "name=r", "combine.method=auto"])
    with pytest.raises(FileNotFoundError, match="combine.method=auto"):
        combine_method(cfg.run_dir, cfg)  # not chosen yet
    run_pipeline(cfg, only="combiner")
    report = json.loads((cfg.run_dir / "combiner" / "eval.json").read_text())
    data = load_data(cfg.data)
    recount = {m: (Combiner.from_run(cfg.run_dir, method=m).predict(data.x_val) == data.y_val).float().mean().item()
               for m in AUTO}
    assert report["method_choice"] == pytest.approx(recount, abs=1.5 / len(data.y_val))
    assert report["method"] == max(AUTO, key=report["method_choice"].get)  # a tie goes to the KL combiner
    assert recount[report["method"]] >= max(recount.values()) - 1.5 / len(data.y_val)
    labels = {"fixed_point": "KL combiner", "within_subset": "within-subset combiner"}
    assert report["table3"][1]["system"].startswith(labels[report["method"]])
    x = data.x_test[:100]
    torch.testing.assert_close(Combiner.from_run(cfg.run_dir).predict_proba(x),
                               Combiner.from_run(cfg.run_dir, method=report["method"]).predict_proba(x))


def test_simple_combiners_and_conditional_accuracy():
    p_general = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]], dtype=torch.float64)
    subsets = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    probs = [torch.tensor([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]], dtype=torch.float64),
             torch.tensor([[0.4, 0.3, 0.3], [0.1, 0.1, 0.8]], dtype=torch.float64)]
    e = expand(p_general, probs[0], subsets[0])
    assert torch.allclose(e[0], torch.tensor([0.2, 0.7, 0.05, 0.05], dtype=torch.float64))
    avg = average_combine(p_general, active_outputs(p_general, probs, subsets, 1), subsets)  # example 0: specialist 0; 1: 1
    assert torch.allclose(avg[0], (p_general[0] + e[0]) / 2)
    assert torch.allclose(avg[1], (p_general[1] + expand(p_general, probs[1], subsets[1])[1]) / 2)
    low = lowest_dustbin_combine(p_general, active_outputs(p_general, probs, subsets, 4), subsets)  # both active for both
    assert torch.equal(low, e)  # specialist 0's dustbins (0.1, 0.4) are the lower ones
    alone = lowest_dustbin_combine(p_general, active_outputs(p_general, probs, subsets, 1), subsets)
    assert torch.equal(alone[1], expand(p_general, probs[1], subsets[1])[1])  # the only active one
    labels = torch.tensor([1, 2])
    assert conditional_top1(p_general, labels, subsets) == 0.0  # 0 beats 1 in {0, 1}; 3 beats 2 in {2, 3}
    assert conditional_top1(avg, labels, subsets) == 0.5


def test_conditional_counts_against_a_loop_over_subsets():
    """All (example, subset) pairs at once = each subset's rows and columns taken one at a time, ties
    (integer scores) included: the first class in the subset's order wins."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        num_classes, num_examples, num_subsets = (int(torch.randint(1, n, (1,), generator=g)) for n in (30, 20, 6))
        subsets = [torch.randperm(num_classes, generator=g)[:int(torch.randint(1, num_classes + 1, (1,), generator=g))]
                   for _ in range(num_subsets)]
        scores = torch.randint(0, 4, (num_examples, num_classes), generator=g).float()
        labels = torch.randint(0, num_classes, (num_examples,), generator=g)
        hits, pairs = 0, 0
        for s in subsets:
            inside = torch.isin(labels, s)
            hits += int((s[scores[inside][:, s].argmax(dim=1)] == labels[inside]).sum())
            pairs += int(inside.sum())
        assert conditional_counts(scores, labels, subsets) == (hits, pairs)

def test_within_subset_combiner_against_a_slow_reference():
    """The generalist's mass on each active subset, shared out by the specialist's distribution within
    it; the mean over several active specialists; the generalist's distribution where none is active."""
    g = torch.Generator().manual_seed(1)
    p_general = torch.randn(40, 7, generator=g).mul(2).softmax(1).double()
    subsets = [torch.tensor([0, 3]), torch.tensor([3, 5, 6]), torch.tensor([1])]
    probs = [torch.randn(40, len(s) + 1, generator=g).softmax(1).double() for s in subsets]
    for top_n in (1, 2):
        q = combine(p_general, probs, subsets, top_n=top_n, method="within_subset")
        for i in range(40):
            top = set(p_general[i].argsort(descending=True)[:top_n].tolist())
            parts = []
            for p, s in zip(probs, subsets):
                if top & set(s.tolist()):
                    part = p_general[i].clone()
                    mass = sum(p_general[i, c].item() for c in s.tolist())
                    for k, c in enumerate(s.tolist()):
                        part[c] = mass * p[i, k] / (1 - p[i, -1])
                    parts.append(part)
            expected = sum(parts) / len(parts) if parts else p_general[i]
            torch.testing.assert_close(q[i], expected)
            assert q[i].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_within_subset_combiner_when_the_dustbin_holds_nearly_everything(dtype):
    """1 - p^m_⊥ is 0 in floating point here; q must still be the specialist's proportions inside S."""
    p_general = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]], dtype=dtype)
    p_special = torch.tensor([[1e-30, 3e-30, 1.0], [0.0, 0.0, 1.0]], dtype=dtype)
    q = combine(p_general, [p_special], [[0, 1]], method="within_subset")
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(2, dtype=dtype))
    torch.testing.assert_close(q[0], torch.tensor([0.2, 0.6, 0.2], dtype=dtype))  # 0.8 shared 1:3
    torch.testing.assert_close(q[1], p_general[1])  # nothing left inside: the generalist's own proportions


def test_the_evaluation_block_by_block_is_the_evaluation_of_the_whole_test_set(trained, monkeypatch):
    """The combiner stage runs the ensemble a block of test images at a time (memory): the same results, for
    every kind of system, as all at once; a system at a smaller top_n sees only its own active specialists."""
    import combiner.stage as evaluate

    data = load_data(trained.data)
    ensemble = Combiner.from_run(trained.run_dir, top_n=2)
    subsets = ensemble.subsets
    systems = {"kl": (lambda g, outputs: ensemble.combine(g, outputs, "fixed_point"), 1),
               "average": (lambda g, outputs: average_combine(g, outputs, subsets), 2),
               "lowest": (lambda g, outputs: lowest_dustbin_combine(g, outputs, subsets), 1)}
    whole = evaluate_systems(ensemble, systems, data.x_test, data.y_test, data.num_classes)
    monkeypatch.setattr(evaluate, "BLOCK_BYTES", 5 * 8 * data.num_classes)  # 5 images at a time
    blocks = evaluate_systems(ensemble, systems, data.x_test, data.y_test, data.num_classes)
    for name in systems:
        assert torch.equal(blocks[name].right, whole[name].right)
        assert (blocks[name].hits, blocks[name].pairs) == (whole[name].hits, whole[name].pairs)
    at_one = Combiner.from_run(trained.run_dir, top_n=1, method="fixed_point").predict(data.x_test)
    assert torch.equal(whole["kl"].right, at_one == data.y_test)
    assert torch.equal(whole["kl"].active[1], evaluate.active_specialists(
        predict_logits(ensemble.generalist, data.x_test, device=torch.device("cpu")).double().softmax(1), subsets, 1))


def test_the_combiner_refuses_images_it_cannot_use_and_says_what_it_takes(trained):
    """Issue 21: float or int64 images in 0..255, another image size, another channel count and a batch
    without its channel axis were taken silently or failed inside torch."""
    ensemble = Combiner.from_run(trained.run_dir)
    x = load_data(trained.data).x_test[:8]  # uint8 (8, 1, 8, 8)
    good = ensemble.predict_proba(x)
    torch.testing.assert_close(ensemble.predict_proba(x.float() / 255), good)
    bad = {
        r"float images must lie in \[0, 1\], got values in \[0, 255\]": x.float(),
        "images must be uint8 .* got torch.int64": x.long(),
        r"trained on images of shape \(N, 1, 8, 8\) .* got \(8, 1, 16, 16\)": x.repeat(1, 1, 2, 2),
        r"trained on images of shape \(N, 1, 8, 8\) .* got \(8, 3, 8, 8\)": x.repeat(1, 3, 1, 1),
        r"must be a batch \(N, 1, 8, 8\) \(channels first\), got shape \(8, 8, 8\)": x[:, 0],
    }
    for message, images in bad.items():
        with pytest.raises(ValueError, match=message):
            ensemble.predict_proba(images)
