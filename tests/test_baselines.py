"""The baselines stage's bookkeeping: budgets from training compute, specialists in head order, the
specialists' forward passes, the verdict's rival on a tie."""
import itertools
import json
from collections import Counter

import pytest
from conftest import specialists_run

from baselines import baseline_rows, budgets, load_baseline, training_compute, training_examples
from baselines.stage import equal_inference_net
from combiner import load_ensemble
from ensemble.config import specialist_net_config
from ensemble.cost import multiply_adds
from ensemble.data import load_data
from ensemble.nets import build_net
from ensemble.pipeline import run_pipeline
from ensemble.rundir import write_json
from specialists import heads, task


def test_budgets_add_all_specialists_for_compute_and_the_largest_for_wall_clock():
    assert budgets(100, [30, 50.5], per_epoch=40) == {"compute": 4.5125, "wall_clock": 3.7625}
    assert budgets(100, [], per_epoch=40) == {"compute": 2.5, "wall_clock": 2.5}


def _history(path, examples):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"epoch": i + 1, "examples": e}) + "\n" for i, e in enumerate(examples)))


def test_training_examples_are_in_head_order_past_a_thousand_specialists(tmp_path):
    count = 1002  # m1000 sorts before m101 by name: the head order must not come from the folder names
    write_json(tmp_path / "specialists" / "subsets.json", {"subsets": [[m] for m in range(count)]})
    _history(tmp_path / "generalist" / "metrics.jsonl", [10, 10])
    for m in range(count):
        _history(tmp_path / "specialists" / f"m{m:03d}" / "metrics.jsonl", [m])
    assert training_examples(tmp_path) == (20, list(range(count)))


def test_older_histories_without_example_counts_are_a_clear_error(tmp_path):
    write_json(tmp_path / "specialists" / "subsets.json", {"subsets": [[0]]})
    _history(tmp_path / "generalist" / "metrics.jsonl", [10])
    (tmp_path / "specialists" / "m000").mkdir(parents=True)
    (tmp_path / "specialists" / "m000" / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    with pytest.raises(ValueError, match="does not count its training examples"):
        training_examples(tmp_path)


@pytest.mark.parametrize("wall_clock_epochs", [3, 5])
def test_the_equal_compute_baseline_comes_last_even_on_a_tie(tmp_path, wall_clock_epochs):
    rows = [{"budget": "compute", "epochs": 5}, {"budget": "wall_clock", "epochs": wall_clock_epochs}]
    write_json(tmp_path / "baselines" / "report.json", {"baselines": rows})
    assert [r["budget"] for r in baseline_rows(tmp_path)] == ["wall_clock", "compute"]


@pytest.mark.parametrize("head", ["dustbin", "full"])
def test_specialists_also_pay_for_the_forward_passes_they_make(upstream, tmp_path, monkeypatch, head):
    monkeypatch.setattr(heads, "DUSTBIN_SAMPLE", 500)  # below the 1,293 training images: the cap counts
    cfg = specialists_run(upstream, tmp_path, f"specialists.head={head}", "specialists.width=96")
    data = load_data(cfg.data)
    n, n_val, n_test = len(data.x_train), len(data.x_val), len(data.x_test)
    passes = []  # (images, multiply-adds per image) of every forward pass the specialist tasks make
    predict = task.predict_logits

    def counted(net, x, **kwargs):
        passes.append((len(x), multiply_adds(net, data.input_shape)))
        return predict(net, x, **kwargs)

    monkeypatch.setattr(task, "predict_logits", counted)
    monkeypatch.setattr(heads, "predict_logits", counted)
    run_pipeline(cfg, only="specialists")
    general, special = training_examples(cfg.run_dir)
    ensemble = load_ensemble(cfg.run_dir, cfg)
    generalist, nets = ensemble.generalist, ensemble.specialists
    base = multiply_adds(generalist, data.input_shape)
    k = len(nets)
    # each specialist: its start (a trunk pass over the dustbin's sample, or the plain generalist's soft
    # targets over the training set), its trained net and its start on the validation set, the test set
    start = 500 if head == "dustbin" else n
    assert Counter(rows for rows, _ in passes) == Counter({start: k, n_val: 2 * k, n_test: k})
    if head == "full":  # the teacher is the generalist before widening
        assert {macs for rows, macs in passes if rows == n} == {base}
    # a forward pass is a third of a training step; the dustbin's sample goes through the widened
    # generalist (trunk and head), the soft targets through the plain one, the validation through the specialist
    widened = multiply_adds(build_net(specialist_net_config(cfg), data.input_shape, data.num_classes), data.input_shape)
    start_cost = 500 * widened / base if head == "dustbin" else n
    expected = [(e + 2 * n_val / 3) * multiply_adds(net, data.input_shape) / base + start_cost / 3
                for e, net in zip(special, nets)]
    assert training_compute(cfg.run_dir, cfg, data) == (general, pytest.approx(expected))


@pytest.mark.parametrize("name, width, depth, shape, classes, factor", [
    ("mlp", 8, 1, (1, 28, 28), 1000, 1.7),  # the default's generalist and an ensemble of 1.7 of it
    ("mlp", 8, 1, (1, 28, 28), 3, 1.01),  # a width step overshoots by 12%
    ("cnn", 8, 1, (1, 28, 28), 62, 1.26),  # width steps of ~25%, and a deeper CNN costs 3.5 times as much
    ("cnn", 32, 1, (1, 28, 28), 62, 2.3),
])
def test_the_equal_inference_net_is_the_generalist_widened_until_it_costs_what_the_ensemble_costs(
        name, width, depth, shape, classes, factor):
    from ensemble.config import NetConfig

    def cost(w, d):
        return multiply_adds(build_net(NetConfig(name=name, width=w, depth=d), shape, classes), shape)

    target = factor * cost(width, depth)
    net, macs = equal_inference_net(NetConfig(name=name, width=width, depth=depth), shape, classes, target)
    assert macs == cost(net.width, net.depth) >= target
    narrowest = {d: next(w for w in itertools.count(width) if cost(w, d) >= target) for d in (depth, depth + 1, depth + 2)}
    if cost(narrowest[depth], depth) <= 1.1 * target:  # issue 26: within 10% above, the generalist widened
        assert (net.width, net.depth) == (narrowest[depth], depth)
    else:  # a width step overshoots by more: the cheapest that reaches the target, up to two layers deeper
        assert macs == min(cost(w, d) for d, w in narrowest.items())
    if factor > 1.5:  # the shipped configs' shapes: within 10%
        assert macs <= 1.1 * target


def test_the_equal_inference_rival_is_trained_at_the_ensembles_cost_for_its_compute(upstream, tmp_path):
    cfg = specialists_run(upstream, tmp_path, "specialists.branch_at=1", "baselines.budgets=[compute,inference]")
    run_pipeline(cfg, only="specialists")
    run_pipeline(cfg, only="baselines")
    report = json.loads((cfg.run_dir / "baselines" / "report.json").read_text())
    target, macs = report["ensemble_multiply_adds"], report["inference_multiply_adds"]
    assert target <= macs <= 1.1 * target
    data = load_data(cfg.data)
    ensemble = load_ensemble(cfg.run_dir, cfg)
    base = multiply_adds(ensemble.generalist, data.input_shape)
    assert report["budget_epochs"]["inference"] == pytest.approx(report["budget_epochs"]["compute"] * base / macs)
    row = next(r for r in report["baselines"] if r["budget"] == "inference")
    assert row["multiply_adds"] == macs and row["net"]["width"] > cfg.generalist.net.width
    rival = load_baseline(cfg.run_dir, cfg, data, "inference")
    assert multiply_adds(rival, data.input_shape) == macs


def test_branch_specialists_pay_a_forward_pass_for_the_blocks_they_share(upstream, tmp_path):
    cfg = specialists_run(upstream, tmp_path, "specialists.branch_at=1")
    run_pipeline(cfg, only="specialists")
    data = load_data(cfg.data)
    general, special = training_examples(cfg.run_dir)
    ensemble = load_ensemble(cfg.run_dir, cfg)
    generalist, nets = ensemble.generalist, ensemble.specialists
    shape, n_val = data.input_shape, len(data.x_val)
    base = multiply_adds(generalist, shape)
    front = multiply_adds(generalist, shape, forward=lambda x: generalist.features(x))  # the one block: the trunk
    start = min(heads.DUSTBIN_SAMPLE, len(data.x_train)) * base / 3  # the dustbin's sample through the generalist
    expected = [(e * (multiply_adds(net, shape) - 2 * front / 3) + 2 * n_val / 3 * multiply_adds(net, shape) + start)
                / base for e, net in zip(special, nets)]
    assert training_compute(cfg.run_dir, cfg, data) == (general, pytest.approx(expected))
