"""Any network: torchvision builders and a user's factory in every stage, weights files, the head found,
compute counted, and a generalist the user already has."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from combiner import Combiner
from ensemble.cli import main
from ensemble.config import DataConfig, NetConfig, load_config
from ensemble.cost import multiply_adds
from ensemble.nets import build_net, load_weights, read_weights, start_net
from ensemble.pipeline import STAGES, run_pipeline, state
from ensemble.predictions import read_split
from ensemble.rundir import Manifest, load_tensors


def tiny_factory(num_classes, input_shape, width=8):
    """A user's own net, as the factory convention asks: a conv stage, pooling, a hidden and a final layer."""
    return nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 16), nn.ReLU(),
                         nn.Linear(16, num_classes))


def raising_factory(num_classes, input_shape):
    raise RuntimeError("out of ideas")


def not_a_module(num_classes, input_shape):
    return "a string"


def _images(tmp_path, classes=6, channels=3, size=16, train=40, test=10):
    """An npz of coloured blobs: each class its own colour and position, with noise."""
    rng = np.random.default_rng(0)

    def make(n):
        y = np.repeat(np.arange(classes), n)
        x = rng.normal(0.3, 0.15, (len(y), size, size, channels))
        for c in range(classes):
            r = (c * 5) % (size - 6)
            x[y == c, r:r + 6, r:r + 6, c % channels] += 0.5
        return (x.clip(0, 1) * 255).astype(np.uint8), y

    (x_train, y_train), (x_test, y_test) = make(train), make(test)
    path = tmp_path / "blobs.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def _overrides(tmp_path, net, *extra):
    return ["data.source=npz", f"data.path={_images(tmp_path)}", f"generalist.net.name={net}",
            "generalist.train.epochs=2", "generalist.train.batch_size=32", "cluster.num_subsets=2",
            "cluster.shape=partition", "specialists.train.epochs=1", "specialists.train.batch_size=32",
            "distill_back.train.epochs=1", "distill_back.train.batch_size=32", "launch.num_cpus=1",
            "baselines.budgets=[compute,wall_clock]", f"runs_dir={tmp_path}", "name=r", *extra]


def test_the_equal_inference_rival_is_left_out_with_a_warning_for_a_net_that_has_no_width(capsys):
    import baselines

    cfg = load_config(None, ["generalist.net.name=torchvision:resnet18"])
    assert cfg.baselines.budgets == ["compute", "wall_clock", "inference"]
    baselines.check(cfg)
    assert baselines.stage.trained_budgets(cfg) == ["compute", "wall_clock"]
    assert ("warning: baselines.budgets: inference widens the generalist's net, which is defined for the built-in "
            "nets (mlp, cnn, resnet), not for torchvision:resnet18: that rival is left out") in capsys.readouterr().err


@pytest.mark.parametrize("name, kwargs, head", [
    ("torchvision:resnet18", {}, "fc"),
    ("torchvision:mobilenet_v3_small", {}, "classifier.3"),
    ("torchvision:vit_b_16", {"image_size": 32}, "heads.head"),
    ("test_any_net:tiny_factory", {"width": 4}, "7"),
])
def test_the_head_is_found_wherever_the_model_keeps_it(name, kwargs, head):
    net = build_net(NetConfig(name, kwargs=kwargs), (1, 32, 32), 9).eval()
    x = torch.rand(3, 1, 32, 32)
    assert net.head_path == head and isinstance(net.head, nn.Linear) and net.head.out_features == 9
    assert torch.allclose(net(x), net.head(net.features(x)))
    if name.startswith("torchvision"):  # gray images into an RGB model: repeated over its three channels
        rgb = build_net(NetConfig(name, kwargs=kwargs), (3, 32, 32), 9).eval()
        rgb.load_state_dict(net.state_dict() | {k: v.expand(1, 3, 1, 1) for k, v in net.state_dict().items()
                                                if k.startswith("input_")})
        assert torch.allclose(net(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-6)


def test_multiply_adds_are_counted_by_running_the_model():
    cnn = build_net(NetConfig("cnn", width=8, depth=1), (1, 28, 28), 10)
    convs = [(1, 8, 28), (8, 16, 14), (16, 32, 7), (32, 64, 3)]  # (in, out, side) of each 3x3 conv
    by_hand = sum(c_in * c_out * 9 * side * side for c_in, c_out, side in convs) + 64 * 10
    assert multiply_adds(cnn, (1, 28, 28)) == by_hand
    resnet18 = build_net(NetConfig("torchvision:resnet18"), (3, 224, 224), 1000)
    assert multiply_adds(resnet18, (3, 224, 224)) / 1e9 == pytest.approx(1.8, abs=0.05)  # torchvision: 1.81 GFLOPS


def test_weights_as_the_model_names_them_or_as_this_project_saves_them(tmp_path, capsys):
    import torchvision

    model = torchvision.models.resnet18(num_classes=1000).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    save_file(model.state_dict(), str(tmp_path / "resnet18.safetensors"))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for file in ("resnet18.pth", "resnet18.safetensors"):
        net = start_net(NetConfig("torchvision:resnet18", weights=str(tmp_path / file)), (3, 32, 32), 1000, images)
        net.input_mean.zero_(), net.input_std.fill_(1)
        x = torch.rand(2, 3, 32, 32)
        assert torch.equal(net.eval()(x), model(x))
    # another number of classes: the trunk is loaded, the head starts fresh
    net = start_net(NetConfig("torchvision:resnet18", weights=str(tmp_path / "resnet18.pth")), (3, 32, 32), 7, images)
    assert torch.equal(net.trunk.conv1.weight, model.conv1.weight) and net.head.out_features == 7
    assert "is for another number of classes: the head starts fresh" in capsys.readouterr().out
    # a file older than batch norm's step counters (torchvision's 2017 weights) loads too
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    older = start_net(NetConfig("torchvision:resnet18", weights=_saved(old, tmp_path / "old.pth")), (3, 32, 32),
                      1000, images)
    assert torch.equal(older.trunk.layer1[0].bn1.running_var, model.layer1[0].bn1.running_var)
    # a net of this project's own file (input normalisation included) loads as saved
    again = build_net(NetConfig("torchvision:resnet18"), (3, 32, 32), 7)
    load_weights(again, net.state_dict(), "weights")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))


def _saved(state, path):
    torch.save(state, path)
    return str(path)


def test_torchvision_pretrained_weights_come_from_its_cache(tmp_path, monkeypatch):
    """`net.weights: torchvision` goes through torchvision's weights API; with the file where torch's hub
    caches it, nothing is downloaded."""
    import torchvision
    from torchvision.models import get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = get_model_weights("mobilenet_v3_small").DEFAULT.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    pretrained = torchvision.models.mobilenet_v3_small()
    torch.save(pretrained.state_dict(), cached)
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    net = start_net(NetConfig("torchvision:mobilenet_v3_small", weights="torchvision"), (1, 32, 32), 5, images)
    assert torch.equal(net.trunk.features[0][0].weight, pretrained.features[0][0].weight)
    assert torch.equal(net.trunk.classifier[0].weight, pretrained.classifier[0].weight)


@pytest.mark.parametrize("net, message", [
    (NetConfig("torchvision:resnet19"), "net.name: torchvision has no classification model 'resnet19' "
                                         "(did you mean resnet18"),
    (NetConfig("no_such_module:f"), "net.name: cannot import module 'no_such_module'"),
    (NetConfig("test_any_net:nothing_here"), "net.name: module test_any_net has no callable 'nothing_here'"),
    (NetConfig("test_any_net:raising_factory"), "raised RuntimeError: out of ideas"),
    (NetConfig("test_any_net:not_a_module"), "returned str, not a torch.nn.Module"),
    (NetConfig("torchvision:squeezenet1_1"), "net.head: no nn.Linear of torchvision:squeezenet1_1 produces its 5 "
                                              "class logits as its output; name the final linear layer with net.head"),
    (NetConfig("torchvision:resnet18", head="layer9"), "net.head: the model has no submodule 'layer9'"),
    (NetConfig("torchvision:resnet18", head="layer1"), "net.head: layer1 is a Sequential, not an nn.Linear"),
    (NetConfig("cnn", weights="torchvision"), "net.weights: 'torchvision' takes the pretrained weights of a "
                                             "torchvision:<builder> net, not of cnn"),
    (NetConfig("cnn", kwargs={"channels": 3}), "net: the built-in net cnn takes width, depth and dropout; kwargs"),
])
def test_a_net_that_cannot_be_built_is_named(net, message):
    with pytest.raises(ValueError) as error:
        start_net(net, (3, 32, 32), 5, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert message in str(error.value)


def test_a_model_that_fails_in_training_mode_is_named_before_any_stage():
    from ensemble.nets import check_net

    data = DataConfig(source="synthetic", num_classes=5, train_per_class=20, test_per_class=2, image_size=32)
    with pytest.raises(ValueError, match="generalist.net.name: torchvision:googlenet fails in training mode: "
                                         ".*needs net.kwargs {aux_logits: false}"):
        check_net(NetConfig("torchvision:googlenet", kwargs={"init_weights": False}), "generalist.net", data)
    check_net(NetConfig("torchvision:googlenet", kwargs={"init_weights": False, "aux_logits": False}),
              "generalist.net", data)


def test_pretrained_weights_that_cannot_be_fetched_are_named(tmp_path, monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ValueError, match="generalist.net.weights: could not fetch torchvision's pretrained weights "
                                         "for resnet18 from https://download.pytorch.org/.*no network"):
        start_net(NetConfig("torchvision:resnet18", weights="torchvision"), (3, 32, 32), 5,
                  torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "generalist.net")


def test_weights_that_do_not_fit_name_the_tensor_and_both_shapes(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not weights at all")
    with pytest.raises(ValueError, match="junk.pth is neither a safetensors file nor a PyTorch state dict"):
        read_weights(tmp_path / "junk.pth", "net.weights")
    small = build_net(NetConfig("cnn", width=4), (1, 28, 28), 5)
    with pytest.raises(ValueError, match=r"trunk.0.weight has shape \(4, 1, 3, 3\), the net expects \(8, 1, 3, 3\)"):
        load_weights(build_net(NetConfig("cnn", width=8), (1, 28, 28), 5), small.state_dict(), "net.weights")


def test_bad_nets_stop_the_run_before_it_writes_anything(tmp_path, capsys):
    base = _overrides(tmp_path, "torchvision:resnet18", "launch.backend=inline")
    for extra, message in [
        (["generalist.net.name=torchvision:resnet19"], "generalist.net.name: torchvision has no classification model"),
        (["distill_back.net.name=test_any_net:raising_factory", "distill_back.init=scratch"],
         "distill_back.net.name: test_any_net:raising_factory(**{'num_classes': 6, 'input_shape': (3, 16, 16)}) "
         "raised RuntimeError: out of ideas"),
        (["specialists.width=64"], "specialists.width: widening is defined for the built-in nets"),
        (["specialists.branch_at=layer5"], "specialists.branch_at: the model has no module 'layer5' (did you mean "
                                           "layer4"),
        ([f"generalist.checkpoint={tmp_path}/none.safetensors"], "generalist.checkpoint: "),
        ([f"generalist.net.weights={tmp_path}/none.pth"], "generalist.net.weights: "),
    ]:
        assert main(["run", *base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r").exists()


def _run_and_predict(tmp_path, overrides):
    cfg = load_config(None, overrides)
    summaries = run_pipeline(cfg)
    combiner = Combiner.from_run(cfg.run_dir)
    x = torch.from_numpy(np.load(cfg.data.path)["x_test"]).permute(0, 3, 1, 2).contiguous()
    q = combiner.predict_proba(x)
    assert q.shape == (len(x), 6) and torch.allclose(q.sum(1), torch.ones(len(x), dtype=q.dtype), atol=1e-5)
    evaluation = json.loads((cfg.run_dir / "combiner" / "eval.json").read_text())
    assert (combiner.predict(x) == torch.from_numpy(np.load(cfg.data.path)["y_test"])).float().mean().item() \
        == pytest.approx(evaluation["ensemble_top1"])
    return cfg, summaries


@pytest.mark.slow
def test_the_pipeline_runs_a_torchvision_model_on_ray(tmp_path):
    """torchvision's resnet18 (random init) as generalist, specialists with a frozen trunk and a head of
    their own, baselines and student; the specialists and baselines as Ray tasks."""
    cfg, summaries = _run_and_predict(tmp_path, _overrides(
        tmp_path, "torchvision:resnet18", "specialists.freeze_trunk=true", "specialists.head_hidden=8"))
    assert set(summaries) == {s.name for s in STAGES}
    specialist = load_tensors(cfg.run_dir / "specialists" / "m000" / "model.safetensors")
    generalist = load_tensors(cfg.run_dir / "generalist" / "model.safetensors")
    assert torch.equal(specialist["trunk.layer4.1.conv2.weight"], generalist["trunk.layer4.1.conv2.weight"])
    assert "head.hidden.weight" in specialist
    report = json.loads((cfg.run_dir / "distill_back" / "report.json").read_text())
    macs = {r["system"]: r["multiply_adds"] for r in report["systems"]}
    assert macs["generalist"] == multiply_adds(build_net(cfg.generalist.net, (3, 16, 16), 6), (3, 16, 16))


def test_branch_specialists_of_a_torchvision_model_share_it_up_to_a_named_module(tmp_path):
    """`branch_at: layer3`: each specialist keeps the generalist's tensors up to layer3 and trains layer4 and its
    head; the combiner runs the shared part once and counts the ensemble's cost as the shared part plus the
    active branches."""
    cfg, _ = _run_and_predict(tmp_path, _overrides(tmp_path, "torchvision:resnet18", "specialists.branch_at=layer3",
                                                   "specialists.select_on_validation=false",
                                                   "specialists.train.lr=0.01", "baselines.budgets=[]",
                                                   "launch.backend=inline"))
    specialist = load_tensors(cfg.run_dir / "specialists" / "m000" / "model.safetensors")
    generalist = load_tensors(cfg.run_dir / "generalist" / "model.safetensors")
    assert all(torch.equal(t, generalist[k]) for k, t in specialist.items() if k.startswith("trunk.layer3."))
    assert not torch.equal(specialist["trunk.layer4.1.conv2.weight"], generalist["trunk.layer4.1.conv2.weight"])
    combiner = Combiner.from_run(cfg.run_dir)
    assert combiner.shared_blocks == "layer3"
    net = build_net(cfg.generalist.net, (3, 16, 16), 6)
    whole = multiply_adds(net, (3, 16, 16))
    branch = whole - multiply_adds(net, (3, 16, 16), forward=lambda x: net.front(x, "layer3"))
    evaluation = json.loads((cfg.run_dir / "combiner" / "eval.json").read_text())
    assert whole < evaluation["ensemble_multiply_adds"] <= whole + 2 * branch  # 2 specialists, each active or not


def test_the_pipeline_runs_a_users_factory_from_the_working_directory_on_ray(tmp_path, monkeypatch):
    """The factory above, imported by the Ray workers (specialists, baselines) from the working
    directory, as a user's module would be."""
    monkeypatch.chdir(Path(__file__).parent)
    cfg, _ = _run_and_predict(tmp_path, _overrides(tmp_path, "test_any_net:tiny_factory",
                                                   "generalist.net.kwargs={width: 6}"))
    report = json.loads((cfg.run_dir / "specialists" / "report.json").read_text())
    assert report["launch"]["backend"] == "ray" and report["specialists"][0]["node_id"] is not None
    assert report["specialists"][0]["pid"] != os.getpid()


def test_an_imported_generalist_is_evaluated_not_trained_and_its_rivals_train_on(upstream, tmp_path, capsys):
    from conftest import specialists_run

    checkpoint = tmp_path / "mine.safetensors"
    checkpoint.write_bytes((upstream / "generalist" / "model.safetensors").read_bytes())
    # lr ~ 0: a rival that trains on from the imported generalist predicts as it does, one from scratch would not
    cfg = specialists_run(upstream, tmp_path, f"generalist.checkpoint={checkpoint}", "generalist.train.lr=1e-12",
                          name="imported")
    run_pipeline(cfg, only="generalist")
    out = capsys.readouterr().out
    assert "imported from" in out and "epoch" not in out
    mine, theirs = (read_split(r / "generalist" / "predictions", "test") for r in (cfg.run_dir, upstream))
    assert torch.equal(mine.probs, theirs.probs)
    metrics = json.loads((cfg.run_dir / "generalist" / "metrics.json").read_text())
    assert metrics["imported"] is True and metrics["epochs"] == 0
    for stage in ("cluster", "specialists", "baselines", "combiner"):
        run_pipeline(cfg, only=stage)
    report = json.loads((cfg.run_dir / "baselines" / "report.json").read_text())
    assert [r["system"] for r in report["baselines"]] == [
        "generalist trained on for the specialists' compute", "generalist trained on for the longest specialist's compute",
        "generalist widened to the ensemble's inference cost, trained on for the specialists' compute"]
    assert report["baselines"][2]["net"]["width"] > cfg.generalist.net.width  # and it starts as the generalist:
    for budget in ("compute", "wall_clock", "inference"):
        pred = load_tensors(cfg.run_dir / "baselines" / budget / "predictions.safetensors")["test_pred"]
        assert torch.equal(pred, mine.probs.argmax(1))
    assert "The generalist was imported from" in (cfg.run_dir / "combiner" / "tables.md").read_text()
    capsys.readouterr()
    assert main(["status", str(cfg.run_dir)]) == 0
    assert f"generalist: imported from {checkpoint}" in capsys.readouterr().out

    stage = next(s for s in STAGES if s.name == "generalist")
    moved = tmp_path / "elsewhere.safetensors"  # the same file at another path is the same input
    checkpoint.rename(moved)
    assert state(stage, specialists_run(upstream, tmp_path, f"generalist.checkpoint={moved}",
                                        "generalist.train.lr=1e-12", name="imported"), Manifest(cfg.run_dir)) == "done"
    assert state(stage, cfg, Manifest(cfg.run_dir)) == "stale"  # gone: it cannot be verified
    assert main(["status", str(cfg.run_dir)]) == 0
    other = load_tensors(moved)  # another generalist in the file: the generalist is done no more
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in other.items()}, str(checkpoint))
    assert state(stage, cfg, Manifest(cfg.run_dir)) == "stale"


def test_an_imported_checkpoint_that_does_not_fit_stops_the_run(upstream, tmp_path, capsys):
    from conftest import SPECIALISTS_TINY

    checkpoint = upstream / "generalist" / "model.safetensors"
    args = ["run", *SPECIALISTS_TINY, f"runs_dir={tmp_path}", "name=r", f"generalist.checkpoint={checkpoint}",
            "generalist.net.width=32"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "generalist.checkpoint" in err and "trunk.1.weight has shape (64, 64), the net expects (32, 64)" in err
    assert not (tmp_path / "r").exists()


def test_pretrained_weights_for_a_builder_that_has_none_are_named(monkeypatch):
    import torchvision.models

    def no_weights(name):
        raise ValueError(f"The model {name} has no weights")

    monkeypatch.setattr(torchvision.models, "get_model_weights", no_weights)
    with pytest.raises(ValueError, match="generalist.net.weights: torchvision has no pretrained weights for resnet18"):
        start_net(NetConfig("torchvision:resnet18", weights="torchvision"), (3, 32, 32), 5,
                  torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "generalist.net")


def test_a_batch_larger_than_the_training_set_is_an_error(tmp_path):
    from ensemble.config import TrainConfig
    from ensemble.train import fit

    net = build_net(NetConfig("mlp", width=4), (1, 4, 4), 3)
    x, y = torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="generalist: batch_size 16 is larger than the 10 training examples"):
        fit(net, x, y, TrainConfig(batch_size=16), tmp_path, seed=0, device=torch.device("cpu"), desc="generalist")
