"""The distill_back stage on a tiny run: soft targets, the student, the report, resuming, bad input."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import SPECIALISTS_TINY, specialists_run

import distill_back.stage
from combiner import Combiner, load_ensemble
from ensemble.config import load_config
from ensemble.cost import multiply_adds
from ensemble.data import load_data
from ensemble.pipeline import run_pipeline
from ensemble.train import predict_logits

OPTIONS = ["distill_back.augmented_copies=1", "distill_back.temperature=3"]


def _cfg(tmp_path, *overrides, name="r"):
    return load_config(None, [*SPECIALISTS_TINY, f"runs_dir={tmp_path}", f"name={name}", *overrides])


@pytest.fixture(scope="module")
def distilled(upstream, tmp_path_factory):
    cfg = specialists_run(upstream, tmp_path_factory.mktemp("distilled"), *OPTIONS)
    run_pipeline(cfg)
    return cfg


def test_soft_targets_are_the_combiners_log_q_on_the_transfer_set(distilled):
    data = load_data(distilled.data)
    cached = {"log_q": torch.from_numpy(np.load(distilled.run_dir / "distill_back" / "soft_targets" / "log_q.npy"))}
    n = len(data.x_train)
    assert cached["log_q"].shape == (2 * n, data.num_classes)  # the training set and one augmented copy (all classes)
    q = Combiner.from_run(distilled.run_dir).predict_proba(data.x_train[:200])
    torch.testing.assert_close(cached["log_q"][:200].exp(), q, atol=1e-5, rtol=0)
    assert not torch.equal(cached["log_q"][n:n + 200], cached["log_q"][:200])  # other inputs, other targets


def test_report_counts_compute_and_the_baselines_get_it(distilled):
    report = json.loads((distilled.run_dir / "distill_back" / "report.json").read_text())
    rows = {r["system"]: r for r in report["systems"]}
    data = load_data(distilled.data)
    run = distilled.run_dir
    n = len(data.x_train)

    def examples(path):
        return sum(json.loads(line)["examples"] for line in path.read_text().splitlines())

    general = examples(run / "generalist" / "metrics.jsonl")
    special = [examples(run / "specialists" / f"m{m:03d}" / "metrics.jsonl") for m in range(3)]
    student = examples(run / "distill_back" / "metrics.jsonl")
    control = examples(run / "distill_back" / "control" / "metrics.jsonl")
    assert student == control == 2 * (2 * n // 128 * 128)  # 2 epochs over the doubled transfer set
    # compute in examples at the generalist's cost: a specialist's weighted by its multiply-adds
    ensemble = load_ensemble(run, distilled)
    generalist, nets = ensemble.generalist, ensemble.specialists
    base = multiply_adds(generalist, data.input_shape)
    # forward passes at a third of a training step: the dustbin's sample through the generalist, the
    # validation set twice through the specialist
    weighted = [(e + 2 * len(data.x_val) / 3) * multiply_adds(net, data.input_shape) / base + min(4096, n) / 3
                for e, net in zip(special, nets)]
    assert all(0.9 < multiply_adds(net, data.input_shape) / base < 1 for net in nets)  # their heads are smaller
    assert rows["generalist"]["train_epochs"] == pytest.approx(general / n)
    assert rows["ensemble"]["train_epochs"] == pytest.approx((general + sum(weighted)) / n)
    assert rows["student"]["train_epochs"] == pytest.approx((general + sum(weighted) + student) / n)
    assert rows["self-distilled (control)"]["train_epochs"] == pytest.approx((general + control) / n)
    # the baselines: the fewest whole epochs (of the examples an epoch trains on) covering that compute
    per_epoch = n // distilled.generalist.train.batch_size * distilled.generalist.train.batch_size
    for title, spent in (("equal-compute", sum(weighted)), ("equal-wall-clock", max(weighted))):
        (name, row), = [(k, r) for k, r in rows.items() if k.startswith(title)]
        epochs = int(name.split("(")[1].split()[0])
        assert epochs == row["train_epochs"] == math.ceil((general + spent) / per_epoch)
        folder = run / "baselines" / ("compute" if title == "equal-compute" else "wall_clock")
        assert len((folder / "metrics.jsonl").read_text().splitlines()) == epochs
        assert row["parameters"] == rows["generalist"]["parameters"]
    assert rows["student"]["parameters"] == rows["generalist"]["parameters"]
    assert rows["ensemble"]["parameters"] > 3 * rows["generalist"]["parameters"]
    assert rows["student"]["multiply_adds"] == rows["generalist"]["multiply_adds"] < rows["ensemble"]["multiply_adds"]
    combine = json.loads((run / "combiner" / "eval.json").read_text())
    assert rows["ensemble"]["test_top1"] == pytest.approx(combine["ensemble_top1"], abs=1.5 / len(data.y_test))
    gain = report["ensemble_top1"] - report["generalist_top1"]
    assert combine["comparisons"][0]["rival"] == "generalist" and combine["comparisons"][0]["call"] == "beats"
    for key in ("student", "control"):
        expected = (report[f"{key}_top1"] - report["generalist_top1"]) / gain
        assert report[f"{key}_gain_kept"] == pytest.approx(expected)
    rows = [{"system": s, "test_top1": t} for s, t in (("generalist", 0.8), ("ensemble", 0.8004), ("student", 0.81))]
    level = distill_back.stage._summary(rows, beats_generalist=False)  # a gain within the noise: no share
    assert level["student_gain_kept"] is None and level["student_top1"] == 0.81
    assert distill_back.stage._summary(rows, beats_generalist=True)["student_gain_kept"] == pytest.approx(25)
    assert (run / "distill_back" / "distill_back.png").stat().st_size > 0


def test_rerun_of_an_interrupted_stage_reuses_the_soft_targets(distilled, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(distilled.run_dir, tmp_path / "r")
    cfg = _cfg(tmp_path, *OPTIONS)
    stage = tmp_path / "r" / "distill_back"
    (stage / "report.json").unlink()  # as if killed after the soft targets were written
    written = {p: p.stat().st_mtime_ns for p in stage.rglob("*.npy")}
    run_pipeline(cfg)
    assert (stage / "report.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in stage.rglob("*.npy")} == written  # not made again


def test_soft_targets_of_another_teacher_or_unreadable_are_made_again(distilled, tmp_path, monkeypatch, capsys):
    """Issue 21: a corrupt cache failed every rerun; a cache was taken if its labels matched."""
    import shutil
    shutil.copytree(distilled.run_dir, tmp_path / "r")
    stage = tmp_path / "r" / "distill_back"
    targets = stage / "soft_targets" / "log_q.npy"
    good = targets.read_bytes()
    targets.write_bytes(good[:1000] + bytes(len(good) - 1000))  # damaged in place
    (stage / "report.json").unlink()
    run_pipeline(_cfg(tmp_path, *OPTIONS))
    assert "soft targets in" in capsys.readouterr().err and targets.read_bytes() == good  # made again, the same
    shutil.rmtree(stage / "soft_targets")
    shutil.copytree(stage / "control" / "soft_targets", stage / "soft_targets")  # the generalist's, not the ensemble's
    (stage / "report.json").unlink()
    run_pipeline(_cfg(tmp_path, *OPTIONS))
    assert targets.read_bytes() == good


def test_other_baselines_rerun_the_stage_that_reports_them(distilled, tmp_path):
    import shutil
    shutil.copytree(distilled.run_dir, tmp_path / "r")
    run_pipeline(_cfg(tmp_path, *OPTIONS, "baselines.budgets=[compute]"))
    report = json.loads((tmp_path / "r" / "distill_back" / "report.json").read_text())
    baselines = [r["system"] for r in report["systems"] if r["system"].startswith("equal-")]
    assert len(baselines) == 1 and baselines[0].startswith("equal-compute generalist")


def test_the_control_learns_the_generalists_own_predictions(distilled):
    """Self-distillation: the control's soft targets are the generalist's log-softmax; the report says
    what it keeps."""
    run = distilled.run_dir
    data = load_data(distilled.data)
    generalist = Combiner.from_run(run).generalist
    cached = {"log_q": torch.from_numpy(np.load(run / "distill_back" / "control" / "soft_targets" / "log_q.npy"))}
    n = len(data.x_train)
    torch.testing.assert_close(cached["log_q"][:n], predict_logits(generalist, data.x_train, device=torch.device("cpu")).log_softmax(dim=1),
                               atol=1e-5, rtol=0)
    assert "the self-distilled control keeps" in (run / "distill_back" / "report.md").read_text()


@pytest.mark.parametrize("override, message", [
    ("distill_back.temperature=0", "'distill_back.temperature' must be > 0"),
    ("distill_back.alpha=1.5", r"'distill_back.alpha' must be in \[0, 1\]"),
    ("distill_back.augmented_copies=-1", "'distill_back.augmented_copies' must be >= 0"),
    ("distill_back.net={name: mlp, width: 16}", "init=generalist needs the generalist's architecture"),
])
def test_bad_settings_fail_before_any_stage_runs_and_lose_nothing(distilled, tmp_path, override, message):
    """Even with every stage before it still to run, and with the stage's earlier outputs in place."""
    import shutil
    with pytest.raises(ValueError, match=message):
        run_pipeline(_cfg(tmp_path, override, name="fresh"))
    assert not (tmp_path / "fresh" / "generalist").exists()
    shutil.copytree(distilled.run_dir, tmp_path / "r")
    before = sorted(p.name for p in (tmp_path / "r" / "distill_back").iterdir())
    with pytest.raises(ValueError, match=message):
        run_pipeline(_cfg(tmp_path, *OPTIONS, override))
    assert sorted(p.name for p in (tmp_path / "r" / "distill_back").iterdir()) == before


def test_a_student_at_the_ensembles_inference_cost_starts_as_the_generalist_widened(distilled, tmp_path):
    """Issue 26: `distill_back.net: inference` is the baselines stage's equal-inference-cost net; it starts
    as the generalist widened, so distillation's gain over that rival on hard labels shows in the report."""
    import shutil

    shutil.copytree(distilled.run_dir, tmp_path / "r")
    cfg = _cfg(tmp_path, *OPTIONS, "distill_back.net=inference", "distill_back.control=false")
    data = load_data(cfg.data)
    ensemble = load_ensemble(cfg.run_dir, cfg)
    student = distill_back.stage.make_student(cfg, data, ensemble.generalist)
    wide = json.loads((cfg.run_dir / "baselines" / "report.json").read_text())["inference_net"]
    assert student.head.in_features == wide["width"] > cfg.generalist.net.width
    x = data.x_test[:64]
    torch.testing.assert_close(predict_logits(student, x, device=torch.device("cpu")),
                               predict_logits(ensemble.generalist, x, device=torch.device("cpu")), rtol=0, atol=1e-5)
    run_pipeline(cfg, only="distill_back")
    rows = {r["system"]: r for r in json.loads((cfg.run_dir / "distill_back" / "report.json").read_text())["systems"]}
    rival = next(r for name, r in rows.items() if name.startswith("equal-inference-cost generalist"))
    assert rows["student"]["multiply_adds"] == rival["multiply_adds"] > rows["generalist"]["multiply_adds"]
    epochs = next(r for r in json.loads((cfg.run_dir / "baselines" / "report.json").read_text())["baselines"]
                  if r["budget"] == "inference")["epochs"]  # training compute in generalist epochs: at its own cost
    assert rival["train_epochs"] == pytest.approx(epochs * rival["multiply_adds"] / rows["generalist"]["multiply_adds"])


def test_a_student_at_the_inference_cost_needs_the_rival_that_defines_it(tmp_path):
    with pytest.raises(ValueError, match=r"distill_back.net=inference is the baselines stage's equal-inference-cost "
                                         r"net, which baselines.budgets \['compute'\] does not train"):
        run_pipeline(_cfg(tmp_path, "distill_back.net=inference", "baselines.budgets=[compute]", name="fresh"))
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(ValueError, match="'distill_back.net.widht'"):  # a section's own errors, not the union's
        _cfg(tmp_path, "distill_back.net={name: mlp, widht: 3}")


def test_a_deeper_inference_net_starts_from_scratch_with_a_warning(distilled, tmp_path, capsys):
    """Where widening overshot the ensemble's cost, the baselines stage deepened the rival; the
    generalist's weights cannot start that student, which the stage says before training it afresh."""
    import shutil

    shutil.copytree(distilled.run_dir, tmp_path / "r")
    report_path = tmp_path / "r" / "baselines" / "report.json"
    report = json.loads(report_path.read_text())
    report["inference_net"]["depth"] = 2
    report_path.write_text(json.dumps(report))
    cfg = _cfg(tmp_path, *OPTIONS, "distill_back.net=inference")
    student = distill_back.stage.make_student(cfg, load_data(cfg.data), load_ensemble(cfg.run_dir, cfg).generalist)
    assert len([m for m in student.trunk if isinstance(m, torch.nn.Linear)]) == 2
    assert "the equal-inference-cost net is deeper than the generalist (depth 2)" in capsys.readouterr().err
