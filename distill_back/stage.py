"""Stage 6, `distill_back`: one student network learns the ensemble's combined distribution q*.

Writes `soft_targets/` (log q* on the transfer set, each example's top `distill_back.top_k` classes and a
tail bucket, streamed to memory-mapped files and reused, or gone on with, by a resumed run), the student's `model.safetensors`, `metrics.jsonl` and checkpoint; with `distill_back.control` the
same in `control/` for a student taught by the generalist alone (self-distillation, the control that
tells the ensemble's knowledge from the effect of distillation itself); and `report.json`, `report.md`
and `distill_back.png`: test top-1 and NLL of every system (the baselines stage's generalists too), the
share of the ensemble's gain the student and the control keep, what each system costs to train and run.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from baselines import baseline_rows, baseline_title, load_baseline, trained_budgets, training_compute
from combiner import Combiner, beats_generalist, combine_method, load_ensemble
from ensemble.config import Config, NetConfig, config_hash, from_dict
from ensemble.cost import multiply_adds, parameters, timed_predictions
from ensemble.data import Data, data_fingerprint, load_data
from ensemble.layout import NetDir, RunDir
from ensemble.nets import Net, build_net, check_net, load_net, start_net
from ensemble.parallel import check_workers, fit_parallel, train_storage
from ensemble.rundir import file_hash, read_json, save_tensors, write_json, write_text
from ensemble.train import predict_logits, resolve_device
from specialists import active_shares, widen

from .loss import distillation_loss
from .plots import plot_distill_back
from .transfer import soft_targets, transfer_set


def run(run_dir: Path, cfg: Config) -> dict:
    """Soft targets from the ensemble, the student trained on them, the control, and the report."""
    paths = RunDir(run_dir)
    out = paths.stage("distill_back")
    dcfg = cfg.distill_back
    check(cfg)
    data = load_data(cfg.data)
    device = resolve_device(cfg.device)
    ensemble = load_ensemble(run_dir, cfg)
    generalist = ensemble.generalist
    method = combine_method(run_dir, cfg)
    combiner = Combiner(generalist, ensemble.specialists, ensemble.subsets, top_n=cfg.combine.top_n[0],
                        method=method, device=device, input_shape=ensemble.input_shape,
                        shared_blocks=ensemble.shared_blocks)
    batch = dcfg.train.eval_batch_size

    def generalist_proba(xb: torch.Tensor) -> torch.Tensor:
        return predict_logits(generalist, xb, device=device, batch_size=batch).double().softmax(dim=1)

    specialist_weights = [paths.specialist(m).weights for m in range(len(ensemble.subsets))]
    teachers = {"student": (combiner.predict_proba, paths.student,
                            _soft_targets_key(cfg, [paths.generalist.weights, *specialist_weights], method))}
    if dcfg.control:  # self-distillation: tells the ensemble's knowledge from the effect of distillation itself
        teachers["self-distilled (control)"] = (generalist_proba, paths.control,
                                                _soft_targets_key(cfg, [paths.generalist.weights], "generalist"))
    # training compute in epochs at the generalist's cost per example; a teacher's counts for its student
    general, special = training_compute(run_dir, cfg, data)
    n = len(data.x_train)
    models = {"generalist": (generalist, general / n), "ensemble": (combiner, (general + sum(special)) / n)}
    base = multiply_adds(generalist, data.input_shape)
    histories = {}
    for name, (predict_proba, folder, key) in teachers.items():
        student, history = train_student(cfg, data, generalist, predict_proba, key, folder, device, name)
        teacher = general + (sum(special) if name == "student" else 0)
        own = sum(r["examples"] for r in history) * multiply_adds(student, data.input_shape) / base
        models[name] = (student, (teacher + own) / n)
        histories[name] = history
    for row in baseline_rows(run_dir):  # its epochs at its own cost per example
        models[baseline_title(row)] = (
            load_baseline(run_dir, cfg, data, row["budget"]), row["epochs"] * row.get("multiply_adds", base) / base)

    rows = [_evaluate(name, model, train_epochs, data, cfg, device) for name, (model, train_epochs) in models.items()]
    beats = beats_generalist(read_json(paths.evaluation))
    summary = {**_summary(rows, beats), "student_train_seconds": _seconds(histories["student"])}
    write_json(paths.distill_report, {**summary, "device": str(device), "systems": rows,
                                       "history": histories["student"]})
    text = report_markdown(rows, summary)
    write_text(out / "report.md", text)
    plot_distill_back(out / "distill_back.png", rows, histories["student"],
                      read_json(paths.generalist.metrics)["val_top1"])
    print(text, flush=True)
    return summary


def train_student(cfg: Config, data: Data, generalist: Net, predict_proba: Callable[[torch.Tensor], torch.Tensor],
                  key: str, folder: NetDir, device: torch.device, desc: str) -> tuple[Net, list[dict]]:
    """A student trained in `folder` on the soft targets of `predict_proba` (computed once, streamed into
    `soft_targets/` under `key`, so that a resumed run goes on from them) and the hard labels; its
    weights go to `model.safetensors`."""
    dcfg = cfg.distill_back
    student = make_student(cfg, data, generalist)
    x, labels = transfer_set(data, dcfg.augmented_copies, cfg.seed)
    teacher = soft_targets(folder.soft_targets, key, predict_proba, x, dcfg.train.eval_batch_size, dcfg.top_k,
                           dcfg.temperature, desc=f"{desc}: soft targets")
    print(f"distill_back: {desc}, {parameters(student):,} parameters ({dcfg.init} start), transfer set "
          f"{len(x):,} images ({int((labels >= 0).sum()):,} labelled), T={dcfg.temperature}, alpha={dcfg.alpha}",
          flush=True)
    history = fit_parallel(student, x, (*teacher.tensors(), labels), dcfg.train, folder.folder, seed=cfg.seed,
                           device=device, launch=cfg.launch, storage=train_storage(cfg, "distill_back"),
                           section="distill_back.train",
                           loss_fn=lambda z, t: distillation_loss(z, t[0] if len(t) == 2 else t[:3], t[-1],
                                                                  temperature=dcfg.temperature, alpha=dcfg.alpha),
                           val=(data.x_val, data.y_val), desc=desc, clean_images=True)
    save_tensors(folder.weights, student.state_dict())
    return student, history


def check(cfg: Config) -> None:
    """The stage's settings, checked before the pipeline starts any stage."""
    dcfg = cfg.distill_back
    if dcfg.net == "inference" and "inference" not in trained_budgets(cfg):
        raise ValueError("distill_back.net=inference is the baselines stage's equal-inference-cost net, which "
                         f"baselines.budgets {cfg.baselines.budgets} does not train (for {cfg.generalist.net.name}): "
                         "add inference to it, or name the student's net")
    if dcfg.init == "generalist" and dcfg.net not in (None, "inference") and dcfg.net != cfg.generalist.net:
        raise ValueError("distill_back.init=generalist needs the generalist's architecture "
                         f"(distill_back.net {dcfg.net} is not generalist.net {cfg.generalist.net}): "
                         "set distill_back.init=scratch")
    if dcfg.augmented_copies and cfg.data.source == "imagefolder":
        raise ValueError("distill_back.augmented_copies makes affine copies of in-memory images; a streamed image "
                         "folder is augmented as the student trains (data.train_transform): set "
                         "distill_back.augmented_copies=0")
    if isinstance(dcfg.net, NetConfig):
        check_net(dcfg.net, "distill_back.net", cfg.data)
    check_workers(dcfg.train, "distill_back.train", cfg.launch)


def make_student(cfg: Config, data: Data, generalist: Net) -> Net:
    """`distill_back.net` (default: the generalist's; `inference`: the equal-inference-cost net the
    baselines stage trained), from the generalist's weights (widened for a wider net) or afresh (`check`
    has passed)."""
    net_cfg = student_net(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.distill_back.init == "scratch":
        return start_net(net_cfg, data.input_shape, data.num_classes, data.x_train, "distill_back.net")
    if net_cfg == cfg.generalist.net:
        return load_net(net_cfg, data.input_shape, data.num_classes, generalist.state_dict(), "the generalist's weights")
    if net_cfg.depth != cfg.generalist.net.depth:  # known only now, from the baselines stage: not an error
        print(f"warning: distill_back.init=generalist: the equal-inference-cost net is deeper than the generalist "
              f"(depth {net_cfg.depth}), so its weights cannot start it: the student starts from scratch",
              file=sys.stderr, flush=True)
        return start_net(net_cfg, data.input_shape, data.num_classes, data.x_train, "distill_back.net")
    return widen(generalist, build_net(net_cfg, data.input_shape, data.num_classes))


def student_net(cfg: Config) -> NetConfig:
    """The student's net: `distill_back.net`, the generalist's, or the baselines stage's inference net."""
    net = cfg.distill_back.net
    if net == "inference":
        return from_dict(NetConfig, read_json(RunDir(cfg.run_dir).baselines_report)["inference_net"])
    return net or cfg.generalist.net


def report_markdown(rows: list[dict], summary: dict) -> str:
    lines = ["| system | test top-1 | test NLL | training compute (generalist epochs) | parameters | multiply-adds per example | "
             "examples/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['test_top1']:.2%} | {r['test_nll']:.4f} | {r['train_epochs']:.1f} | "
              f"{r['parameters']:,} | {r['multiply_adds']:,.0f} | {r['examples_per_s']:,.0f} |" for r in rows]
    gain = summary["ensemble_top1"] - summary["generalist_top1"]
    for name, key in (("the student", "student"), ("the self-distilled control", "control")):
        if f"{key}_top1" in summary:
            kept = summary[f"{key}_gain_kept"]
            lines += ["", f"{name} keeps " + ("n/a (the ensemble did not beat the generalist beyond two standard errors)" if kept is None
                                              else f"{kept:.0%}") + " of the ensemble's gain over the generalist "
                      f"({summary[f'{key}_top1'] - summary['generalist_top1']:+.2%} of {gain:+.2%} top-1)"]
    return "\n".join(lines) + "\n"


def _soft_targets_key(cfg: Config, weights: list[Path], method: str) -> str:
    """What a teacher's soft targets depend on: the weights of the nets that make them (content hashes),
    how they are combined, the transfer set, and with top-k targets k and the temperature (the tail
    bucket is tempered)."""
    dcfg = cfg.distill_back
    return config_hash([file_hash(w) for w in weights], cfg.combine.top_n[0], method, cfg.seed,
                       dcfg.augmented_copies, data_fingerprint(cfg.data),
                       None if dcfg.top_k is None else (dcfg.top_k, dcfg.temperature))


def _seconds(history: list[dict]) -> float:
    return round(sum(r["seconds"] for r in history), 2)


def _evaluate(name: str, model: Net | Combiner, train_epochs: float, data: Data, cfg: Config,
              device: torch.device) -> dict:
    """Test top-1 and NLL, and the inference cost: parameters, multiply-adds per test example on
    average (the ensemble's: the generalist, then the specialists active for it past their shared
    blocks), examples per second."""
    batch = cfg.distill_back.train.eval_batch_size
    if isinstance(model, Combiner):
        predict = model.predict_proba
        shares = active_shares(model.generalist, [s.cpu() for s in model.subsets], model.top_n, data.x_test,
                               device=device, batch_size=batch, channels_last=cfg.generalist.train.channels_last)
        macs, count = model.multiply_adds(shares), model.parameter_count()
    else:
        def predict(x: torch.Tensor) -> torch.Tensor:
            return predict_logits(model, x, device=device, batch_size=batch).softmax(dim=1)
        macs, count = multiply_adds(model, data.input_shape), parameters(model)
    metrics, rate = timed_predictions(predict, data.x_test, data.y_test, batch)
    return {
        "system": name,
        **metrics,
        "train_epochs": train_epochs,
        "parameters": count,
        "multiply_adds": macs,
        "examples_per_s": rate,
    }


def _summary(rows: list[dict], beats_generalist: bool) -> dict:
    """The headline numbers; a gain kept = (student - generalist) / (ensemble - generalist) in test
    top-1, None unless the ensemble beat the generalist beyond two paired standard errors (the combine
    stage's call): a share of a gain within the noise says nothing."""
    top1 = {r["system"]: r["test_top1"] for r in rows}
    gain = top1["ensemble"] - top1["generalist"]
    summary = {"generalist_top1": top1["generalist"], "ensemble_top1": top1["ensemble"]}
    for key, system in (("student", "student"), ("control", "self-distilled (control)")):
        if system in top1:
            summary[f"{key}_top1"] = top1[system]
            summary[f"{key}_gain_kept"] = (top1[system] - top1["generalist"]) / gain if beats_generalist else None
    summary["gain_kept"] = summary["student_gain_kept"]
    return summary
