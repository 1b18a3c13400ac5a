"""Train the generalist on hard labels, or import one the user already has; write its weights, test
metrics and held-out predictions."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ensemble.config import Config, TrainConfig
from ensemble.cost import parameters
from ensemble.data import Data, Images, load_data
from ensemble.layout import RunDir
from ensemble.metrics import classification_sums
from ensemble.nets import Net, build_net, check_net, load_weights, read_weights, start_net
from ensemble.parallel import check_workers, fit_parallel, train_storage
from ensemble.predictions import Chunk, sparsify, write_predictions
from ensemble.rundir import file_hash, save_tensors, write_json, write_text
from ensemble.train import epochs_text, kept_epoch, logit_batches, resolve_device


def run(run_dir: Path, cfg: Config) -> dict:
    """Train on all classes, or with `generalist.checkpoint` load that generalist instead; write
    `model.safetensors`, `predictions/` (its validation and test predictions, top-k or dense as
    `generalist.top_k` says: `ensemble.predictions`; the cluster stage's input) and `metrics.json`."""
    out = RunDir(run_dir).generalist
    data = load_data(cfg.data)
    device = resolve_device(cfg.device)
    checkpoint = cfg.generalist.checkpoint
    if checkpoint is None:
        net, history = train_generalist(cfg, data, cfg.generalist.train, out.folder, device, "generalist",
                                        storage=train_storage(cfg, "generalist"))
        origin = {}
    else:
        net, own_stats = import_generalist(cfg, data.input_shape, data.num_classes, data.x_train)
        history = []
        if not own_stats:
            print(f"warning: generalist.checkpoint {checkpoint} holds the model's weights without an input "
                  "normalisation: its inputs are normalised by the training images' per-channel mean and deviation; "
                  "if it was trained with other statistics (ImageNet's), its accuracy here will differ",
                  file=sys.stderr, flush=True)
        print(f"generalist: imported from {checkpoint} ({cfg.generalist.net.name}, {parameters(net):,} "
              f"parameters): evaluated, not trained", flush=True)
        write_text(out.history, "")  # it trained on no example here: its training compute is unknown
        origin = {"imported": True, "imported_sha256": file_hash(Path(checkpoint))}  # no path: a moved file is the same
    save_tensors(out.weights, net.state_dict())

    metrics = {}
    for split, x, y in (("test", data.x_test, data.y_test), ("val", data.x_val, data.y_val)):
        sums: dict[str, float] = {}
        write_predictions(out.prediction_folder, split, _predictions(net, x, y, cfg, device, sums))
        metrics.update({f"{split}_{key}": value / len(y) for key, value in sums.items()})
    metrics.update({
        "epochs": len(history),
        "kept_epoch": kept_epoch(history, cfg.generalist.train),
        "train_seconds": round(sum(r["seconds"] for r in history), 2),
        "parameters": parameters(net),
        "num_classes": data.num_classes,
        "device": str(device),
        "train_workers": cfg.generalist.train.workers,
        **origin,
    })
    write_json(out.metrics, metrics)
    print(f"generalist{' (imported)' if origin else ''}: test top-1 {metrics['test_top1']:.4f}  "
          f"top-5 {metrics['test_top5']:.4f}  NLL {metrics['test_nll']:.4f}", flush=True)
    return metrics


def _predictions(net: Net, x: Images, y: torch.Tensor, cfg: Config, device: torch.device,
                 sums: dict[str, float]) -> Iterator[Chunk]:
    """The generalist's predictions on `x`, batch by batch, as `generalist.top_k` keeps them; adds each
    batch's `classification_sums` into `sums`."""
    start = 0
    for (logits,) in logit_batches([net], x, device=device, batch_size=cfg.generalist.train.eval_batch_size,
                                   channels_last=cfg.generalist.train.channels_last):
        labels = y[start:start + len(logits)]
        start += len(logits)
        for key, value in classification_sums(logits, labels).items():
            sums[key] = sums.get(key, 0) + value
        yield sparsify(logits, labels, cfg.generalist.top_k)


def check(cfg: Config) -> None:
    """Before any stage runs: the generalist's net builds and starts (`check_net`), or
    `generalist.checkpoint` exists and fits it; `generalist.train.workers` can run."""
    if cfg.generalist.checkpoint is None:
        check_net(cfg.generalist.net, "generalist.net", cfg.data)
        check_workers(cfg.generalist.train, "generalist.train", cfg.launch)
    else:
        data = load_data(cfg.data)
        import_generalist(cfg, data.input_shape, data.num_classes, data.x_train[:2])


def import_generalist(cfg: Config, input_shape: tuple[int, int, int], num_classes: int,
                      images: Images) -> tuple[Net, bool]:
    """The generalist in `generalist.checkpoint`: weights for `generalist.net`, as this project saves
    them (with their input normalisation) or as the model names them (then normalised by the per-channel
    statistics of the uint8 training `images`, as a fresh net is); and whether the file held its own
    normalisation."""
    path = cfg.generalist.checkpoint
    net = build_net(cfg.generalist.net, input_shape, num_classes, "generalist.net")
    net.set_input_stats(images)
    state = read_weights(Path(path), "generalist.checkpoint")
    load_weights(net, state, f"generalist.checkpoint {path}")
    return net, "input_mean" in state


def train_generalist(cfg: Config, data: Data, train: TrainConfig, workdir: Path, device: torch.device,
                     desc: str, on_epoch: Callable[[list[dict]], None] | None = None,
                     start: dict[str, torch.Tensor] | None = None, *, storage: str) -> tuple[Net, list[dict]]:
    """`cfg.generalist.net` trained on hard labels with `train`, resuming from `workdir` (the generalist,
    and the baselines: the same recipe for another number of epochs), on `train.workers` Ray Train workers
    keeping checkpoints in `storage` where more than one. It starts from `start` (a generalist's weights:
    the baselines of an imported one train it on) or else as `start_net` makes it."""
    torch.manual_seed(cfg.seed)
    shape, classes = data.input_shape, data.num_classes
    if start is None:
        net = start_net(cfg.generalist.net, shape, classes, data.x_train, "generalist.net")
    else:
        net = build_net(cfg.generalist.net, shape, classes, "generalist.net")
        load_weights(net, start, "the generalist's weights")
    print(f"{desc}: {cfg.generalist.net.name} with {parameters(net):,} parameters on {data.num_classes} "
          f"classes, {len(data.x_train):,} train / {len(data.x_val):,} val / {len(data.x_test):,} test images"
          f"{f' streamed from {data.x_train.root}' if data.streamed else ''}, "
          f"{epochs_text(train)}{' from the imported generalist' if start is not None else ''}, "
          + (f"{train.workers} Ray Train workers" if train.workers > 1 else f"device {device}"), flush=True)
    history = fit_parallel(net, data.x_train, data.y_train, train, workdir, seed=cfg.seed, device=device,
                           launch=cfg.launch, storage=storage, section="generalist.train",
                           val=(data.x_val, data.y_val), desc=desc, on_epoch=on_epoch)
    return net, history
