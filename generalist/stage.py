"""Train the generalist on hard labels; write its weights, test metrics and held-out predictions."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ensemble.config import Config, TrainConfig
from ensemble.cost import parameters
from ensemble.data import Data, load_data
from ensemble.layout import RunDir
from ensemble.metrics import classification_metrics
from ensemble.nets import Net, build_net
from ensemble.rundir import save_tensors, write_json
from ensemble.train import fit, predict_logits, resolve_device


def run(run_dir: Path, cfg: Config) -> dict:
    """Train on all classes; write `model.safetensors`, `predictions.safetensors` (validation and test
    logits, probabilities and labels: the input of the cluster stage) and `metrics.json`."""
    out = RunDir(run_dir).generalist
    data = load_data(cfg.data)
    device = resolve_device(cfg.device)
    net, history = train_generalist(cfg, data, cfg.generalist.train, out.folder, device, "generalist")
    save_tensors(out.weights, net.state_dict())

    batch = cfg.generalist.train.eval_batch_size
    logits = {split: predict_logits(net, x, device=device, batch_size=batch,
                                    channels_last=cfg.generalist.train.channels_last)
              for split, x in (("val", data.x_val), ("test", data.x_test))}
    save_tensors(out.predictions, {
        "val_logits": logits["val"], "val_probs": logits["val"].softmax(dim=1), "val_labels": data.y_val,
        "test_logits": logits["test"], "test_probs": logits["test"].softmax(dim=1), "test_labels": data.y_test,
    })
    metrics = {
        **classification_metrics(logits["test"], data.y_test, "test_"),
        **classification_metrics(logits["val"], data.y_val, "val_"),
        "epochs": len(history),
        "train_seconds": round(sum(r["seconds"] for r in history), 2),
        "parameters": parameters(net),
        "num_classes": data.num_classes,
    }
    write_json(out.metrics, metrics)
    print(f"generalist: test top-1 {metrics['test_top1']:.4f}  top-5 {metrics['test_top5']:.4f}  "
          f"NLL {metrics['test_nll']:.4f}", flush=True)
    return metrics


def train_generalist(cfg: Config, data: Data, train: TrainConfig, workdir: Path, device: torch.device,
                     desc: str, on_epoch: Callable[[list[dict]], None] | None = None) -> tuple[Net, list[dict]]:
    """A fresh `cfg.generalist.net` trained on hard labels with `train`, resuming from `workdir` (the
    generalist, and the baselines: the same recipe for another number of epochs)."""
    torch.manual_seed(cfg.seed)
    net = build_net(cfg.generalist.net, data.input_shape, data.num_classes)
    net.set_input_stats(data.x_train)
    print(f"{desc}: {cfg.generalist.net.name} with {parameters(net):,} parameters on {data.num_classes} "
          f"classes, {len(data.x_train):,} train / {len(data.x_val):,} val / {len(data.x_test):,} test images, "
          f"{train.epochs} epochs, device {device}", flush=True)
    history = fit(net, data.x_train, data.y_train, train, workdir, seed=cfg.seed, device=device,
                  val=(data.x_val, data.y_val), desc=desc, on_epoch=on_epoch)
    return net, history
