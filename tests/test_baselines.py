"""The baselines stage's bookkeeping: budgets from training compute, specialists in head order, the
specialists' forward passes, the verdict's rival on a tie."""
import json
from collections import Counter

import pytest
from conftest import specialists_run

from baselines import baseline_rows, budgets, training_compute, training_examples
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
