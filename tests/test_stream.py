"""The streamed image-folder source: the index, decoding in DataLoader workers, augmentation that does not
depend on the workers, bad input, the folder's fingerprint, and the pipeline end to end on files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ensemble.config import DataConfig, TrainConfig, load_config
from ensemble.data import (
    ImageFiles,
    data_fingerprint,
    image_batches,
    channel_stats,
    load_data,
    stream,
)
from ensemble.data import check as check_data
from ensemble.train import fit

COLOURS = ((220, 30, 30), (30, 200, 40), (40, 40, 230))


def write_tree(root: Path, per_class: dict[str, int], *, noise: int = 60, seed: int = 0) -> None:
    """root/<split>/class<c>/<i>.png|jpg: images of each class tinted its colour, PNG and JPEG, two sizes,
    RGB, grey and palette modes mixed (grey ones keep only the tint's brightness)."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                side = (24, 20) if i % 2 else (40, 48)
                pixels = np.clip(np.array(colour) + rng.integers(-noise, noise + 1, (side[1], side[0], 3)), 0, 255)
                image = Image.fromarray(pixels.astype(np.uint8))
                if i % 3 == 0:
                    image.save(folder / f"{i}.jpg", quality=95)
                else:
                    mode = {2: "P", 4: "L"}.get(i % 6, "RGB")  # palette and grey PNGs among the RGB ones
                    image.convert(mode).save(folder / f"{i}.png")
            (folder / "notes.txt").write_text("not an image: not in the index")


def folder_config(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": "imagefolder", "path": str(root), "image_size": 16, "val_fraction": 0.25,
                         "workers": 0, **kw})


def decoded(x: ImageFiles, **kw) -> torch.Tensor:
    return torch.cat(list(image_batches(x, 7, **kw)))


def test_an_image_folder_is_an_index_of_files_decoded_per_batch(tmp_path):
    write_tree(tmp_path, {"train": 8, "test": 3})
    data = load_data(folder_config(tmp_path))
    assert data.streamed and isinstance(data.x_train, ImageFiles)
    assert data.class_names == ["class0", "class1", "class2"]
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (18, 6, 9)
    assert data.input_shape == (3, 16, 16) and data.x_train.files.dtype.kind == "S"  # paths, no pixels
    test = decoded(data.x_test)
    assert test.shape == (9, 3, 16, 16) and test.dtype == torch.uint8
    means = test.float().mean(dim=(2, 3))  # every image of class c is tinted COLOURS[c]
    for c, colour in enumerate(COLOURS):
        assert torch.allclose(means[data.y_test == c], torch.tensor(colour, dtype=torch.float32), atol=25)
    grey = load_data(folder_config(tmp_path, channels=1))
    assert decoded(grey.x_test).shape == (9, 1, 16, 16)


def test_the_normalisation_of_a_streamed_set_is_summed_batch_by_batch_right(tmp_path):
    write_tree(tmp_path, {"train": 10, "test": 2})
    files = load_data(folder_config(tmp_path)).x_train
    mean, std = channel_stats(files, limit=len(files))  # every image, in batches, in float64
    exact = channel_stats(decoded(files))  # the in-memory formula on the same images
    torch.testing.assert_close(mean, exact[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(std, exact[1], rtol=0, atol=1e-5)
    assert mean.shape == (1, 3, 1, 1)
    sampled = channel_stats(files, limit=5)  # evenly spaced rows only
    rows = np.unique(np.linspace(0, len(files) - 1, 5).round().astype(np.int64))
    torch.testing.assert_close(sampled[0], channel_stats(decoded(files[rows]))[0], rtol=0, atol=1e-5)


def test_a_val_folder_is_the_validation_split(tmp_path):
    write_tree(tmp_path, {"train": 4, "val": 2, "test": 2})
    data = load_data(folder_config(tmp_path))
    assert len(data.x_train) == 12 and len(data.x_val) == 6
    assert all(f.startswith(b"val/") for f in data.x_val.files)


def test_workers_decode_the_same_batches_and_augmentation_follows_the_seed_alone(tmp_path):
    write_tree(tmp_path, {"train": 6, "test": 2})
    files = load_data(folder_config(tmp_path)).x_train
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(3))
    train = {w: decoded(ImageFiles(**{**files.__dict__, "workers": w}), order=order, train=True,
                        gen=torch.Generator().manual_seed(5)) for w in (0, 2)}
    assert torch.equal(train[0], train[2])  # the same epoch whatever the number of workers
    again = decoded(files, order=order, train=True, gen=torch.Generator().manual_seed(6))
    assert not torch.equal(train[0], again)  # another seed, other crops
    state = torch.get_rng_state()
    plain = decoded(files, order=order)
    assert torch.equal(torch.get_rng_state(), state)  # decoding in this process leaves the training's RNG alone
    assert not torch.equal(plain, train[0])  # evaluation: resize and centre crop, no augmentation
    assert torch.equal(plain, decoded(files, order=order))


def child_processes(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines (from Linux's /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):  # a process that ended while we looked
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="lists processes through Linux's /proc")
def test_workers_start_from_a_fork_server_never_as_forks_of_the_threaded_caller(tmp_path):
    write_tree(tmp_path, {"train": 6, "test": 2})
    files = load_data(folder_config(tmp_path, workers=2)).x_train
    before = child_processes(os.getpid())
    batches = image_batches(files, 4, train=True, gen=torch.Generator().manual_seed(0))
    next(batches)  # the epoch's workers live until it ends
    new = {pid: command for pid, command in child_processes(os.getpid()).items() if pid not in before}
    own = Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert own not in new.values()  # a fork would keep this process's command line
    servers = [pid for pid, command in child_processes(os.getpid()).items() if "multiprocessing.forkserver" in command]
    during = {pid for server in servers for pid in child_processes(server)}
    assert sum(len(batch) for batch in batches) == len(files) - 4
    after = {pid for server in servers for pid in child_processes(server)}
    assert len(during - after) == 2  # the epoch's two workers: the server's children, gone with the epoch


def test_data_parallel_shards_of_a_streamed_epoch_are_the_one_process_epoch(tmp_path):
    """Two processes' shards (`shard=(rank, 2)`, 3 images a batch), their batches taken in turn, are the
    batches of one process reading 6 at a time: the same files, the same random crops (each image
    seeded as one process seeds it), and no image twice."""
    write_tree(tmp_path, {"train": 6, "test": 2})
    files = load_data(folder_config(tmp_path)).x_train
    assert 12 < len(files) < 18  # 2 global batches of 6, the rest dropped
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(3))

    def batches(batch: int, shard=(0, 1)) -> list[torch.Tensor]:
        return list(image_batches(files, batch, order=order, train=True, gen=torch.Generator().manual_seed(5),
                                  shard=shard))

    one = batches(6)
    ranks = [batches(3, (rank, 2)) for rank in range(2)]
    assert len(one) == 2 and all(len(b) == 2 for b in ranks)
    for step, whole in enumerate(one):
        assert torch.equal(whole, torch.cat([ranks[0][step], ranks[1][step]]))


def test_training_on_streamed_files_equals_training_on_the_same_images_in_memory(tmp_path):
    """With no random crop, the streamed loop sees exactly the in-memory loop's batches; and a streamed
    run with random crops in two workers, interrupted in its second epoch, resumes to the same weights
    as one that never stopped."""
    from ensemble.config import NetConfig
    from ensemble.nets import build_net

    write_tree(tmp_path, {"train": 8, "test": 2})
    data = load_data(folder_config(tmp_path, train_transform="none"))
    cfg = TrainConfig(epochs=2, batch_size=8, augment="shift", eval_batch_size=16)

    def train(x, folder):
        torch.manual_seed(0)
        net = build_net(NetConfig(name="cnn", width=4), data.input_shape, 3)
        net.set_input_stats(data.x_train)
        fit(net, x, data.y_train, cfg, tmp_path / folder, seed=1, device=torch.device("cpu"),
            val=(data.x_val, data.y_val))
        return net.state_dict()

    streamed, in_memory = train(data.x_train, "s"), train(decoded(data.x_train), "m")
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)

    augmented = ImageFiles(**{**load_data(folder_config(tmp_path)).x_train.__dict__, "workers": 2})  # random crops
    whole = train(augmented, "whole")
    steps = {"n": 0}

    def dying(z, y):  # dies in the second epoch (18 images, 2 steps an epoch)
        steps["n"] += 1
        if steps["n"] == 3:
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(z, y)

    with pytest.raises(KeyboardInterrupt):
        torch.manual_seed(0)
        net = build_net(NetConfig(name="cnn", width=4), data.input_shape, 3)
        net.set_input_stats(data.x_train)
        fit(net, augmented, data.y_train, cfg, tmp_path / "cut", seed=1, device=torch.device("cpu"), loss_fn=dying,
            val=(data.x_val, data.y_val))
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = train(augmented, "cut")
    assert all(torch.equal(resumed[k], whole[k]) for k in resumed)
    assert not all(torch.equal(resumed[k], streamed[k]) for k in resumed)  # the crops did change the training


@pytest.mark.parametrize("make, message", [
    (lambda r: None, "does not exist"),
    (lambda r: (r / "train").mkdir(parents=True) or (r / "test").mkdir(), "train has no class folders"),
    (lambda r: write_tree(r, {"train": 2}), r"test not found.*\{train,test\}"),
    (lambda r: write_tree(r, {"train": 2, "test": 1}) or (r / "train" / "class3").mkdir(), "class3 has no images"),
    (lambda r: [write_tree(r, {"train": 2, "test": 1})] + [__import__("shutil").rmtree(r / s / f"class{c}")
                                                          for s in ("train", "test") for c in (1, 2)],
     "train has 1 class folder: needs at least 2 classes"),
    (lambda r: write_tree(r, {"train": 2, "test": 1}) or write_tree(r / "x", {"test": 1}) or
     (r / "x" / "test" / "class0").rename(r / "test" / "emu"), r"classes \['emu'\] that .*train lacks"),
])
def test_a_folder_that_is_not_an_image_folder_is_a_one_line_error(tmp_path, make, message):
    root = tmp_path / "images"
    make(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_data(folder_config(root))


def test_more_workers_than_cpus_is_an_error(tmp_path):
    write_tree(tmp_path, {"train": 2, "test": 1})
    with pytest.raises(ValueError, match="data.workers is 999 but this machine has"):
        check_data(DataConfig(source="imagefolder", path=str(tmp_path), workers=999))


def test_unreadable_images_stop_the_run_or_are_left_out_once(tmp_path, monkeypatch, capsys):
    root = tmp_path / "images"  # not the cache's folder
    write_tree(root, {"train": 4, "test": 2})
    (root / "train" / "class1" / "broken.png").write_bytes(b"not a png")
    good = root / "train" / "class2" / "0.jpg"
    (root / "train" / "class2" / "cut.jpg").write_bytes(good.read_bytes()[:200])  # truncated
    data = load_data(folder_config(root, workers=2))  # the error comes from a worker process, named as ours
    with pytest.raises(ValueError, match=r"^\S+(broken\.png|cut\.jpg): not a readable image .*data.bad_images=skip"):
        decoded(data.x_train)
        decoded(data.x_val)
    skipped = load_data(folder_config(root, bad_images="skip"))
    assert len(skipped.x_train) + len(skipped.x_val) == 12  # the two bad files are left out
    assert "2 of 14 files in" in capsys.readouterr().err
    assert len(decoded(skipped.x_train)) == len(skipped.x_train)
    check_files = stream.readable_rows
    monkeypatch.setattr(stream, "readable_rows", lambda *a: pytest.fail("checked twice"))
    from ensemble.data import _loaded

    _loaded.clear()
    assert len(load_data(folder_config(root, bad_images="skip")).x_train) == len(skipped.x_train)  # cached
    for cached in (tmp_path / "cache").glob("imagefolder-readable-*.npy"):  # train's and test's
        cached.write_bytes(cached.read_bytes()[:20])  # damaged: checked again, not an error
    monkeypatch.setattr(stream, "readable_rows", check_files)
    _loaded.clear()
    assert len(load_data(folder_config(root, bad_images="skip")).x_train) == len(skipped.x_train)


def test_the_fingerprint_follows_every_file_of_a_folder(tmp_path):
    write_tree(tmp_path, {"train": 2, "test": 1})
    cfg = folder_config(tmp_path)
    first = data_fingerprint(cfg)
    assert data_fingerprint(cfg) == first
    image = tmp_path / "train" / "class0" / "1.png"
    os.utime(image, ns=(0, image.stat().st_mtime_ns + 10**9))  # touched: its modification time changed
    assert data_fingerprint(cfg) != first
    emnist = DataConfig(source="emnist", path=str(tmp_path / "e"))
    (tmp_path / "e" / "EMNIST" / "raw").mkdir(parents=True)
    (tmp_path / "e" / "EMNIST" / "raw" / "f").write_bytes(b"1")
    before = data_fingerprint(emnist)
    (tmp_path / "e" / "unrelated.txt").write_text("a file EMNIST's loader does not read")
    assert data_fingerprint(emnist) == before
    (tmp_path / "e" / "EMNIST" / "raw" / "f").write_bytes(b"12")
    assert data_fingerprint(emnist) != before


def test_a_uri_is_read_through_fsspec(tmp_path):
    write_tree(tmp_path, {"train": 4, "test": 2})
    data = load_data(DataConfig(source="imagefolder", path=f"file://{tmp_path}", image_size=16, workers=0,
                                val_fraction=0.25))
    assert data.x_train.root.startswith("file://") and decoded(data.x_test).shape == (6, 3, 16, 16)


def test_a_worker_that_cannot_read_the_folder_says_so(tmp_path):
    write_tree(tmp_path, {"train": 4, "test": 2})
    data = load_data(folder_config(tmp_path))
    data.check_readable()
    moved = ImageFiles(**{**data.x_train.__dict__, "root": str(tmp_path / "elsewhere")})
    with pytest.raises(FileNotFoundError, match=r"elsewhere is not readable on .*same path.*fsspec URI"):
        stream.check_readable(moved)


def test_the_pipeline_runs_on_a_streamed_folder_and_a_changed_image_makes_it_stale(tmp_path):
    from ensemble.cli import main
    from ensemble.pipeline import STAGES, stage_named, state
    from ensemble.rundir import Manifest

    write_tree(tmp_path / "images", {"train": 10, "test": 4})
    overrides = ["data.source=imagefolder", f"data.path={tmp_path / 'images'}", "data.image_size=16",
                 "data.workers=1", "generalist.net.name=cnn", "generalist.net.width=4", "generalist.train.epochs=2",
                 "generalist.train.batch_size=8", "specialists.train.epochs=1", "specialists.train.batch_size=8",
                 "cluster.num_subsets=2", "cluster.shape=partition", "distill_back.train.epochs=1",
                 "distill_back.train.batch_size=8", "launch.backend=ray", "launch.num_cpus=1",
                 f"runs_dir={tmp_path / 'runs'}", "name=r"]
    assert main(["run", *overrides]) == 0
    run = tmp_path / "runs" / "r"
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(manifest["stages"][s.name]["status"] == "done" for s in STAGES)
    report = json.loads((run / "specialists" / "report.json").read_text())
    assert report["launch"]["backend"] == "ray" and report["launch"]["trained"] == 2
    cfg = load_config(None, overrides)
    assert state(stage_named("generalist"), cfg, Manifest(run)) == "done"
    Image.new("RGB", (20, 20), COLOURS[1]).save(tmp_path / "images" / "train" / "class1" / "1.png")
    assert state(stage_named("generalist"), cfg, Manifest(run)) == "stale"


def test_sixteen_bit_images_are_scaled_and_thirty_two_bit_ones_named(tmp_path):
    write_tree(tmp_path, {"train": 4, "test": 2})
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 0..65535 in 16 bits
    Image.fromarray(ramp).save(tmp_path / "test" / "class0" / "deep.png")  # PIL mode I;16
    data = load_data(folder_config(tmp_path, channels=1))
    deep = decoded(data.x_test[np.char.endswith(data.x_test.files, b"deep.png")])
    assert deep.min() == 0 and deep.max() == 255 and deep.float().mean().item() == pytest.approx(127.5, abs=3)
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(tmp_path / "test" / "class0" / "float.tiff")
    with pytest.raises(ValueError, match=r"float\.tiff: not a readable image \(32-bit float pixels"):
        decoded(load_data(folder_config(tmp_path, channels=1, seed=1)).x_test)
