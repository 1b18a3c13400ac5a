"""The specialists stage on the inline backend: outputs, interruption and rerun, bad input."""
import json

import pytest
import torch
from conftest import specialists_run

import specialists
import specialists.stage
from ensemble.config import load_config
from ensemble.launch import CheckpointStore, Group, check_resources
from ensemble.pipeline import run_pipeline
from ensemble.predictions import read_split
from ensemble.rundir import Manifest, load_tensors


def test_stage_writes_every_specialist_and_the_report(upstream, tmp_path):
    cfg = specialists_run(upstream, tmp_path)
    summary = run_pipeline(cfg)["specialists"]
    out = tmp_path / "r" / "specialists"
    subsets = json.loads((upstream / "cluster" / "subsets.json").read_text())["subsets"]
    assert summary["num_specialists"] == len(subsets) == 3
    report = json.loads((out / "report.json").read_text())
    probs = read_split(upstream / "generalist" / "predictions", "test")
    for s, row in zip(subsets, report["specialists"]):
        folder = out / row["specialist"]
        state = load_tensors(folder / "model.safetensors")
        assert state["head.weight"].shape[0] == len(s["classes"]) + 1
        files = {p.name for p in folder.iterdir()}
        assert {"model.safetensors", "metrics.json", "metrics.jsonl", "checkpoint.pt"} <= files
        # the generalist's conditional accuracy, recomputed slowly from its test probabilities
        hits = [s["classes"][int(torch.tensor([p[c] for c in s["classes"]]).argmax())] == y
                for p, y in zip(probs.probs.tolist(), probs.labels.tolist()) if y in s["classes"]]
        assert row["generalist_conditional_top1"] == pytest.approx(sum(hits) / len(hits))
        assert row["test_in_subset"] == len(hits)
    assert (out / "specialists.png").stat().st_size > 10_000
    assert Manifest(tmp_path / "r").get("specialists")["status"] == "done"


def test_interrupted_stage_reruns_only_the_missing_specialists(upstream, tmp_path, monkeypatch):
    cfg = specialists_run(upstream, tmp_path)
    save = CheckpointStore.save

    def interrupted_save(self, name, checkpoint, epoch, pid):  # Ctrl-C after m001's first epoch
        save(self, name, checkpoint, epoch, pid)
        if name == "m001":
            raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointStore, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    out = tmp_path / "r" / "specialists"
    assert Manifest(tmp_path / "r").get("specialists")["status"] == "interrupted"
    assert (out / "m000" / "metrics.json").is_file() and not (out / "m001" / "metrics.json").exists()
    done_before = (out / "m000" / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(CheckpointStore, "save", save)
    trained = []
    train = specialists.stage.train_specialist
    monkeypatch.setattr(specialists.stage, "train_specialist",
                        lambda job, *a: trained.append(job.name) or train(job, *a))
    run_pipeline(cfg)
    assert trained == ["m001", "m002"]
    assert (out / "m000" / "model.safetensors").stat().st_mtime_ns == done_before
    assert json.loads((out / "m001" / "metrics.json").read_text())["provenance"]["resumed_from_epoch"] == 1

    # resumed through the store, m001 ends exactly where an uninterrupted run ends
    run_pipeline(specialists_run(upstream, tmp_path, name="fresh"))
    resumed = load_tensors(out / "m001" / "model.safetensors")
    fresh = load_tensors(tmp_path / "fresh" / "specialists" / "m001" / "model.safetensors")
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)


def test_a_users_subsets_file_by_class_names(upstream, tmp_path):
    path = tmp_path / "subsets.yaml"
    path.write_text("- ['3', '5', '8']\n- [1, 7]\n")
    summary = run_pipeline(specialists_run(upstream, tmp_path, f"specialists.subsets={path}"))["specialists"]
    assert summary["num_specialists"] == 2
    written = json.loads((tmp_path / "r" / "specialists" / "subsets.json").read_text())["subsets"]
    assert [s["classes"] for s in written] == [[3, 5, 8], [1, 7]]


@pytest.mark.parametrize("text, message", [
    ("- ['3', 'five']\n", "subset 0 .* names unknown class 'five'"),
    ("- [1, 2]\n- [4, 10]\n", "subset 1 .* names class id 10, but the data has classes 0 to 9"),
    ("- [1, 1]\n", "names a class twice"),
    ("subsets: 3\n", "non-empty list of subsets"),
    ("- [1, 2\n", "not valid YAML"),
])
def test_bad_subsets_file_is_a_clear_error(upstream, tmp_path, text, message):
    path = tmp_path / "subsets.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        run_pipeline(specialists_run(upstream, tmp_path, f"specialists.subsets={path}"))
    assert not (tmp_path / "r" / "specialists" / "m000").exists()


def test_generalist_of_the_wrong_shape_is_a_clear_error(upstream, tmp_path):
    cfg = specialists_run(upstream, tmp_path, "generalist.net.width=48")  # not the generalist's width
    with pytest.raises(ValueError, match=r"generalist's weights .* trunk.1.weight has shape \(64, 64\), "
                                         r"the net expects \(48, 64\)"):
        specialists.run(tmp_path / "r", cfg)
    assert not (tmp_path / "r" / "specialists" / "m000").exists()


def test_resources_no_node_has_are_an_error():
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}}, {"Alive": False, "Resources": {"CPU": 64.0}}]
    check_resources(nodes, Group(2, 0.5))
    check_resources(nodes, Group(1, 1))
    with pytest.raises(ValueError, match="asks for 4 CPUs and 0 GPUs .* 2 CPUs and 1 GPUs"):
        check_resources(nodes, Group(4, 0))
    with pytest.raises(ValueError, match="asks for 1 CPUs and 2 GPUs"):
        check_resources(nodes, Group(1, 2))
    with pytest.raises(ValueError, match="'launch.num_gpus' must be in \\[0, 1\\] or a whole number"):
        load_config(None, ["launch.num_gpus=1.5"])


def test_a_specialist_whose_weights_changed_is_trained_again_alone(upstream, tmp_path, monkeypatch, capsys):
    """Issue 21: m000's weights swapped for m001's, then m002's truncated. Each rerun finds the one
    specialist whose weights are not those it trained, trains it alone again (from its last checkpoint),
    and the run's numbers come back."""
    cfg = specialists_run(upstream, tmp_path)
    run_pipeline(cfg)
    out = tmp_path / "r" / "specialists"
    weights = {m: (out / m / "model.safetensors").read_bytes() for m in ("m000", "m001", "m002")}
    evaluation = (tmp_path / "r" / "combiner" / "eval.json").read_text()
    trained = []
    train = specialists.stage.train_specialist
    monkeypatch.setattr(specialists.stage, "train_specialist",
                        lambda job, *a: trained.append(job.name) or train(job, *a))
    for broken, damage in (("m000", weights["m001"]), ("m002", weights["m002"][:100])):
        (out / broken / "model.safetensors").write_bytes(damage)
        trained.clear()
        run_pipeline(cfg)
        assert trained == [broken]
        assert f"specialist {broken}'s weights" in capsys.readouterr().err
        assert {m: (out / m / "model.safetensors").read_bytes() for m in weights} == weights
        assert (tmp_path / "r" / "combiner" / "eval.json").read_text() == evaluation
        assert Manifest(tmp_path / "r").get("specialists")["status"] == "done"


def test_a_corrupt_specialist_checkpoint_restarts_that_specialist_with_a_warning(upstream, tmp_path, monkeypatch,
                                                                                   capsys):
    """Issue 21: after a kill, a damaged checkpoint was an error naming a temporary file that did not exist."""
    cfg = specialists_run(upstream, tmp_path)
    save = CheckpointStore.save

    def interrupted_save(self, name, checkpoint, epoch, pid):  # killed after m000's first epoch
        save(self, name, checkpoint, epoch, pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointStore, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    checkpoint = tmp_path / "r" / "specialists" / "m000" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:50])  # the write cut short
    monkeypatch.setattr(CheckpointStore, "save", save)
    run_pipeline(cfg)
    assert f"warning: checkpoint {checkpoint} is corrupt or not ours" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "r" / "specialists" / "m000" / "metrics.json").read_text())
    assert metrics["provenance"]["resumed_from_epoch"] == 0


def test_specialists_train_until_their_validation_mix_stalls(upstream, tmp_path):
    """Issue 26: `specialists.train.epochs: auto` follows each specialist's subset's validation images and
    as many others as the batches' in-subset share puts beside them; the best epoch's weights are kept."""
    from ensemble.data import load_data
    from ensemble.train import plateau
    from specialists.heads import make_head
    from specialists.task import validation_mix

    cfg = specialists_run(upstream, tmp_path, "specialists.train.epochs=auto", "specialists.train.patience=1",
                          "specialists.train.max_epochs=6", "specialists.in_subset_fraction=0.6")
    data = load_data(cfg.data)
    subset = json.loads((upstream / "cluster" / "subsets.json").read_text())["subsets"][0]["classes"]
    head = make_head(cfg.specialists, subset)
    x, labels = validation_mix(data, head, 0.6, seed=0)
    inside = int(torch.isin(data.y_val, torch.tensor(subset)).sum())
    assert int((labels < len(subset)).sum()) == inside and int((labels == len(subset)).sum()) == round(inside * 0.4 / 0.6)
    assert len(x) == len(labels)
    run_pipeline(cfg, only="specialists")
    for row in json.loads((tmp_path / "r" / "specialists" / "report.json").read_text())["specialists"]:
        folder = tmp_path / "r" / "specialists" / row["specialist"]
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        metrics = json.loads((folder / "metrics.json").read_text())
        state = plateau(history, cfg.specialists.train)
        assert all("val_top1" in r for r in history) and metrics["epochs"] == len(history) <= 6
        assert state.stop or len(history) == 6
        assert metrics["kept_epoch"] == state.best_epoch >= 1
