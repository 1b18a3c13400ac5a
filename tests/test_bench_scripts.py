"""Every benchmark script imports: a rename in the packages must not leave a bench command broken until
someone next runs it (issue 20's package split broke `bench/distill_variants.py` that way)."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import `common` beside them
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert script == "common.py" or callable(module.main)


@pytest.mark.slow
def test_the_gpu_check_says_there_is_no_gpu_and_passes_its_checks_on_the_cpu(monkeypatch, tmp_path, capsys):
    """bench/gpu_check.py: without CUDA it exits 0 saying so; `--device cpu` runs its pipeline on a
    streamed folder and every check, expecting the CPU."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import gpu_check

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)  # as here, also on a GPU machine
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 0 and "no CUDA GPU on this machine" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--classes", "4", "--per-class", "12",
                                      "--image-size", "16", "--workers", "1", "--epochs", "1",
                                      "--batch-size", "8"])
    assert gpu_check.main() == 0
    import json

    checks = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert len(checks) == 9 and all(row["ok"] for row in checks)
    assert checks[-2]["check"] == "ensemble (branch specialists) test probabilities, GPU vs CPU"
    assert checks[-1]["check"] == "generalist on 2 Ray Train workers on cpu" and checks[-1]["devices"] == "cpu"
    assert "all checks passed" in capsys.readouterr().out


def test_the_benches_find_where_the_plateau_schedule_first_cut_the_rate(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import json

    import common
    history = tmp_path / "metrics.jsonl"
    lrs, vals = [2e-3, 2e-3, 2e-4, 2e-4, 2e-5], [0.5, 0.61, 0.6, 0.72, 0.7]
    history.write_text("".join(json.dumps({"lr": lr, "val_top1": v}) + "\n" for lr, v in zip(lrs, vals)))
    assert common.first_cut("g", history, plateau=True) == {"g_first_cut": 3, "g_best_val": 72.0}
    assert common.first_cut("g", history, plateau=False) == {"g_first_cut": None, "g_best_val": 72.0}
