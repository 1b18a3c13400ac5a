"""The baselines stage's bookkeeping: budgets from training compute, specialists in head order, the
specialists' forward passes, the verdict's rival on a tie."""
import json

import pytest
from conftest import specialists_run

from ensemble.cost import multiply_adds
from ensemble.data import load_data
from ensemble.pipeline import run_pipeline
from ensemble.rundir import write_json
from generalist.baselines import baseline_rows, budgets, training_compute, training_examples
from specialists.combiner import load_ensemble


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


@pytest.mark.parametrize("overrides", [["specialists.head=dustbin"], ["specialists.head=full", "specialists.width=96"]])
def test_specialists_also_pay_for_their_forward_passes(upstream, tmp_path, overrides):
    cfg = specialists_run(upstream, tmp_path, *overrides)
    run_pipeline(cfg, only="specialists")
    data = load_data(cfg.data)
    general, special = training_examples(cfg.run_dir)
    n, n_val = len(data.x_train), len(data.x_val)
    generalist, nets, _ = load_ensemble(cfg.run_dir, cfg)
    base = multiply_adds(generalist, data.input_shape)
    # a forward pass is a third of a training step: the dustbin row's fit on a sample of the training set
    # (or the generalist's soft targets over all of it, for §6.1's full softmax), the validation set twice
    full = cfg.specialists.head == "full"
    own = (0 if full else min(4096, n)) + 2 * n_val  # at the specialist's cost
    teacher = n if full else 0  # at the generalist's cost, not the widened specialist's
    expected = [(e + own / 3) * multiply_adds(net, data.input_shape) / base + teacher / 3
                for e, net in zip(special, nets)]
    assert all(multiply_adds(net, data.input_shape) > base for net in nets) == full  # widened: dearer
    assert training_compute(cfg.run_dir, cfg, data) == (general, pytest.approx(expected))
