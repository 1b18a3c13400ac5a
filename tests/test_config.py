import re
from pathlib import Path

import pytest

from ensemble.config import Config, ConfigError, config_hash, load_config, to_dict


def test_defaults_file_and_overrides_stack(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ngeneralist:\n  train:\n    epochs: 3\n    lr: 1\n")
    cfg = load_config(path, ["generalist.train.epochs=7", "data.source=digits", "data.path=/a b",
                             "specialists.train.lr=5e-4"])
    assert cfg.name == "x"
    assert cfg.generalist.train.epochs == 7  # override beats file
    assert cfg.generalist.train.lr == 1.0 and isinstance(cfg.generalist.train.lr, float)  # int widened
    assert cfg.generalist.train.batch_size == Config().generalist.train.batch_size  # default kept
    assert cfg.data.source == "digits" and cfg.data.path == "/a b"
    assert cfg.specialists.train.lr == 5e-4  # YAML 1.1 reads 5e-4 as a string


@pytest.mark.parametrize("override, message", [
    ("generalist.trian.epochs=3", "unknown config key 'generalist.trian' (did you mean 'train'?)"),
    ("generalist.train.epochs=three", "'generalist.train.epochs' must be int or 'auto', got 'three'"),
    ("generalist.train.epochs=2.5", "'generalist.train.epochs' must be int"),
    ("generalist.train.amp=3", "'generalist.train.amp' must be bool"),
    ("generalist.train.lr=fast", "'generalist.train.lr' must be float, got 'fast'"),
    ("generalist.train.smooth_epochs=0", "'generalist.train.smooth_epochs' must be >= 1"),
    ("data.source=mnist", "'data.source' must be one of"),
    ("baselines.budgets=[flops]", "'baselines.budgets[0]' must be one of"),
    ("data=3", "'data' must be a mapping"),
    ("seed", "not of the form key=value"),
    ('baselines.budgets=[compute]"', "the value of 'baselines.budgets' is not valid YAML: found unexpected end"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sorce: npz\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.sorce'"):
        load_config(path)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_yaml_cannot_construct_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_round_trip_and_hash():
    cfg = load_config(None, ["seed=3"])
    again = load_config(None, [f"{k}={v}" for k, v in to_dict(cfg).items() if not isinstance(v, dict)])
    assert to_dict(again) == to_dict(cfg)
    assert config_hash(cfg.generalist) == config_hash(load_config().generalist)
    assert config_hash(cfg.generalist) != config_hash(load_config(None, ["generalist.train.lr=0.5"]).generalist)


def test_an_option_at_its_neutral_value_leaves_the_hash_as_before_the_option_existed():
    """specialists.head_hidden came after runs existed: at 0 it hashes as a section without it."""
    import dataclasses
    import json

    section = load_config().specialists
    before = {k: v for k, v in dataclasses.asdict(section).items() if k not in ("head_hidden", "branch_at")}
    for later in ("workers", "patience", "max_epochs", "smooth_epochs"):  # train.workers came later still, neutral at 1
        before["train"].pop(later)  # (issue 24); patience, max_epochs and smooth_epochs later again (issue 26)
    assert config_hash(section) == config_hash(before)
    assert config_hash(load_config(None, ["specialists.head_hidden=16"]).specialists) != config_hash(before)
    assert json.loads(json.dumps(dataclasses.asdict(section)))["head_hidden"] == 0  # config.yaml still shows it


CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("name", ["default", "glyphs", "omniglot", "emnist", "scale15k"])
def test_shipped_configs_load(name):
    assert load_config(CONFIGS / f"{name}.yaml").name == name


def test_default_yaml_is_the_built_in_default():
    assert to_dict(load_config(CONFIGS / "default.yaml")) == to_dict(Config())


def test_a_baseline_named_twice_is_refused_before_any_stage_runs():
    from baselines import check

    with pytest.raises(ValueError, match="must be distinct"):
        check(load_config(None, ["baselines.budgets=[compute, compute]"]))


@pytest.mark.parametrize("override, message", [
    ("generalist.train.epochs=0", "'generalist.train.epochs' must be >= 1 or 'auto', got 0"),
    ("distill_back.train.epochs=-2", "'distill_back.train.epochs' must be >= 1 or 'auto', got -2"),
    ("specialists.in_subset_fraction=1.5", r"'specialists.in_subset_fraction' must be in \(0, 1\), got 1.5"),
    ("combine.top_n=[]", "'combine.top_n' must be a non-empty list of integers >= 1, got \\[\\]"),
    ("combine.top_n=[1, 0]", "'combine.top_n' must be a non-empty list of integers >= 1"),
    ("cluster.num_subsets=0", "'cluster.num_subsets' must be >= 1, got 0"),
    ("device=tpu", "'device' must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("data.val_fraction=1", r"'data.val_fraction' must be in \(0, 1\)"),
    ("launch.max_retries=-1", "'launch.max_retries' must be >= 0"),
])
def test_every_range_is_checked_when_the_config_is_read(override, message):
    """Issue 21: these failed late (after stages had trained) or with a traceback."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, message", [
    (["cluster.min_size=10", "cluster.max_size=5"], "cluster.min_size 10 is above cluster.max_size 5"),
    (["specialists.in_subset_fraction=0.001"], "leaves no room for both subset and dustbin examples"),
])
def test_settings_that_depend_on_each_other_fail_before_any_stage_runs(tmp_path, overrides, message):
    from ensemble.pipeline import run_pipeline

    with pytest.raises(ValueError, match=message):
        run_pipeline(load_config(None, [f"runs_dir={tmp_path}", *overrides]))
    assert not (tmp_path / "default" / "generalist").exists()


def test_the_cli_reports_errors_in_one_line_and_a_traceback_with_debug(tmp_path, capsys):
    from ensemble.cli import main

    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"\x00\xff\xfe")
    assert main(["run", "--config", str(binary)]) == 2
    assert capsys.readouterr().err == f"error: config file {binary} is not a text file (YAML or JSON)\n"
    broken = tmp_path / "b.yaml"
    broken.write_text("x: [\n")
    assert main(["run", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not valid YAML or JSON" in err and "line 2, column 1" in err
    with pytest.raises(ConfigError):
        main(["--debug", "run", "generalist.train.epochs=0"])
