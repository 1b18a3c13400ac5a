import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ensemble.cli import main
from ensemble.config import load_config
from ensemble.pipeline import STAGES, run_pipeline, state
from ensemble.predictions import read_split
from ensemble.rundir import Manifest

TINY = ["data.source=digits", "generalist.net.name=mlp", "generalist.net.width=32", "generalist.train.epochs=2",
        "specialists.train.epochs=1", "distill_back.train.epochs=1", "launch.backend=inline"]


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"runs_dir={tmp_path}", "name=r", *extra])


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_run_writes_the_run_directory(tmp_path):
    cfg = _cfg(tmp_path)
    summary = run_pipeline(cfg)["generalist"]
    run = tmp_path / "r"
    assert {"manifest.json", "config.yaml", "env.json", "generalist"} <= {p.name for p in run.iterdir()}
    entry = json.loads((run / "manifest.json").read_text())["stages"]["generalist"]
    assert entry["status"] == "done" and entry["seed"] == 0 and entry["seconds"] > 0
    assert set(entry["outputs"]) == {"model.safetensors", "predictions/val-00000.safetensors",
                                     "predictions/test-00000.safetensors", "metrics.json", "metrics.jsonl"}
    val, test = (read_split(run / "generalist" / "predictions", split) for split in ("val", "test"))
    assert val.probs.shape == (len(val.labels), 10) and test.probs.shape == (len(test.labels), 10)  # 10 classes: dense
    assert test.logits.shape == test.probs.shape and test.ids is None
    assert test.probs.sum(1).sub(1).abs().max() < 1e-5
    top1 = (test.probs.argmax(1) == test.labels).float().mean().item()
    assert summary["test_top1"] == pytest.approx(top1)
    assert json.loads((run / "env.json").read_text())["versions"]["torch"]


def test_done_stage_is_skipped_and_changed_config_reruns(tmp_path, capsys):
    run_pipeline(_cfg(tmp_path))
    folder = tmp_path / "r" / "generalist"
    before = _mtimes(folder)
    run_pipeline(_cfg(tmp_path))
    assert "done already" in capsys.readouterr().out and _mtimes(folder) == before

    run_pipeline(_cfg(tmp_path, "device=cpu"))  # the device does not change what a stage computes
    assert "done already" in capsys.readouterr().out

    run_pipeline(_cfg(tmp_path, "generalist.train.epochs=3"))  # its own config changed
    assert "done already" not in capsys.readouterr().out
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 3

    run_pipeline(_cfg(tmp_path, "generalist.train.epochs=3", "data.seed=5"))  # its data changed
    assert "done already" not in capsys.readouterr().out


def test_changed_npz_content_reruns(tmp_path, capsys):
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.images * 15).astype(np.uint8), d.target
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x[:1500], y_train=y[:1500], x_test=x[1500:], y_test=y[1500:])
    cfg = _cfg(tmp_path, "data.source=npz", f"data.path={path}")
    run_pipeline(cfg)
    np.savez(path, x_train=x[:1400], y_train=y[:1400], x_test=x[1500:], y_test=y[1500:])
    assert state(STAGES[0], cfg, Manifest(cfg.run_dir)) == "stale"
    capsys.readouterr()
    run_pipeline(cfg)
    assert "done already" not in capsys.readouterr().out


def test_tampered_output_is_stale_and_remade(tmp_path):
    cfg = _cfg(tmp_path)
    run_pipeline(cfg)
    weights = tmp_path / "r" / "generalist" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"tampered")
    assert state(STAGES[0], cfg, Manifest(cfg.run_dir)) == "stale"
    run_pipeline(cfg)
    assert weights.read_bytes() == good  # remade from the last checkpoint, same bytes
    assert state(STAGES[0], cfg, Manifest(cfg.run_dir)) == "done"


def test_cli_status_and_errors(tmp_path, capsys):
    assert main(["run", *TINY, f"runs_dir={tmp_path}", "name=r"]) == 0
    assert "generalist: test_top1 = " in capsys.readouterr().out
    config = tmp_path / "c.yaml"
    config.write_text("name: r\n")
    assert main(["stage", "generalist", "--config", str(config), *TINY, f"runs_dir={tmp_path}"]) == 0
    assert "done already" in capsys.readouterr().out
    assert main(["status", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "generalist" in out and "done" in out and "test_top1 0." in out
    assert "distill_back: test top-1 generalist 0." in out and "student_top1 0." in out
    assert main(["run", "generalist.train.epochz=3"]) == 2
    assert "unknown config key 'generalist.train.epochz' (did you mean 'epochs'?)" in capsys.readouterr().err
    assert main(["run", "data.source=npz", f"data.path={tmp_path}/none.npz", f"runs_dir={tmp_path}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["stage", "nonsense"])
    with pytest.raises(SystemExit):
        main(["run", "--bogus"])


def _ensemble(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ensemble", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def test_sigkill_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    """kill -9 during epoch 2, rerun the same command: it resumes after epoch 1 and ends with the same
    weights, bit for bit, as a run that was never interrupted."""
    args = ["stage", "generalist", "data.source=synthetic", "data.num_classes=20", "data.train_per_class=200",
            "data.test_per_class=5", "generalist.net.name=cnn", "generalist.net.width=16",
            "generalist.train.epochs=5",
            f"runs_dir={tmp_path}"]
    proc = _ensemble(*args, "name=cut")
    checkpoint = tmp_path / "cut" / "generalist" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), proc.stdout.read()
    assert not (tmp_path / "cut" / "generalist" / "model.safetensors").exists()  # killed mid-training
    assert Manifest(tmp_path / "cut").get("generalist")["status"] == "running"

    out, _ = _ensemble(*args, "name=cut").communicate(timeout=300)
    assert "resumed from" in out and "after epoch 1" in out, out
    assert "generalist epoch 1/5" not in out  # finished work is not redone
    whole, _ = _ensemble(*args, "name=whole").communicate(timeout=300)
    for name in ("model.safetensors", "predictions/val-00000.safetensors", "predictions/test-00000.safetensors"):
        assert (tmp_path / "cut" / "generalist" / name).read_bytes() == \
            (tmp_path / "whole" / "generalist" / name).read_bytes()


def test_status_tells_a_running_stage_from_one_whose_process_died(tmp_path, capsys):
    """Issue 21: after a kill -9 the manifest still says 'running'; `ensemble status` says it died."""
    run_pipeline(_cfg(tmp_path))
    manifest = Manifest(tmp_path / "r")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    manifest.update("generalist", status="running", pid=int(finished.stdout))  # its process is gone
    assert main(["status", str(tmp_path / "r")]) == 0
    assert "generalist    died" in capsys.readouterr().out
    manifest.update("generalist", pid=os.getpid())  # this process: alive
    assert main(["status", str(tmp_path / "r")]) == 0
    assert "generalist    running" in capsys.readouterr().out
    run_pipeline(_cfg(tmp_path))  # a died stage resumes like an interrupted one
    assert Manifest(tmp_path / "r").get("generalist")["status"] == "done"


def test_a_damaged_manifest_is_rebuilt_from_the_stages_records_and_nothing_is_redone(tmp_path, capsys):
    """Issue 21: a corrupt manifest.json came with the advice to delete it, which threw every stage away."""
    cfg = _cfg(tmp_path)
    run_pipeline(cfg)
    before = {s.name: _mtimes(tmp_path / "r" / s.name) for s in STAGES}
    manifest = tmp_path / "r" / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(manifest.read_text()[:100])  # cut short
    capsys.readouterr()
    run_pipeline(cfg)
    out, err = capsys.readouterr()
    assert "is unreadable (ValueError): rebuilt from the stages' own records" in err
    assert out.count("done already") == len(STAGES)
    assert {s.name: _mtimes(tmp_path / "r" / s.name) for s in STAGES} == before
    assert json.loads(manifest.read_text()) == good


def test_a_missing_data_file_stops_the_run_before_it_writes_anything(tmp_path):
    """Checked before any stage runs: the run directory of a run with a missing npz is not created."""
    cfg = _cfg(tmp_path, "data.source=npz", f"data.path={tmp_path / 'nope.npz'}")
    with pytest.raises(FileNotFoundError, match=r"data.path .*nope.npz does not exist \(data.source=npz\)"):
        run_pipeline(cfg)
    assert not (tmp_path / "r").exists()


def test_a_generalist_trained_until_it_stalls_saves_its_best_epoch(tmp_path):
    """Issue 26: `generalist.train.epochs: auto`: the stage's weights are the best validation epoch's."""
    import torch

    from ensemble.rundir import load_checkpoint, load_tensors
    from ensemble.train import plateau

    cfg = _cfg(tmp_path, "generalist.train.epochs=auto", "generalist.train.patience=1",
               "generalist.train.max_epochs=8", "generalist.train.lr=0.05")
    metrics = run_pipeline(cfg, only="generalist")["generalist"]
    folder = tmp_path / "r" / "generalist"
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    state = plateau(history, cfg.generalist.train)
    assert metrics["epochs"] == len(history) and metrics["kept_epoch"] == state.best_epoch
    assert state.stop or len(history) == 8
    best = load_checkpoint(folder / "checkpoint.pt")["best"]
    saved = load_tensors(folder / "model.safetensors")
    assert all(torch.equal(saved[k], best[k]) for k in best)
