import json

import pytest
import torch
import torch.nn.functional as F

from ensemble.config import NetConfig, TrainConfig
from ensemble.nets import build_net
from ensemble.rundir import CHECKPOINT, load_checkpoint, save_checkpoint
from ensemble.train import (LR_DROPS, _lr_lambda, augment, finished_history, fit, kept_epoch, plateau,
                            training_key)

CPU = torch.device("cpu")


def _problem(n=96, classes=4):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % classes
    x = (torch.rand(n, 1, 8, 8, generator=g) * 60 + y[:, None, None, None] * 40).to(torch.uint8)
    return x, y


def _net(seed=0):
    torch.manual_seed(seed)
    return build_net(NetConfig("cnn", width=4, depth=1, dropout=0.2), (1, 8, 8), 4)


CFG = TrainConfig(epochs=3, batch_size=16, augment="shift", warmup_epochs=0.5)


def _weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_same_seed_same_weights(tmp_path):
    x, y = _problem()
    a, b, c = _net(), _net(), _net()
    fit(a, x, y, CFG, tmp_path / "a", seed=0, device=CPU)
    fit(b, x, y, CFG, tmp_path / "b", seed=0, device=CPU)
    fit(c, x, y, CFG, tmp_path / "c", seed=1, device=CPU)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


class Interrupt(Exception):
    pass


def test_interrupted_fit_resumes_to_the_same_weights(tmp_path):
    x, y = _problem()
    full = _net()
    hist_full = fit(full, x, y, CFG, tmp_path / "full", seed=0, device=CPU, val=(x, y))

    calls = {"n": 0}

    def dying_loss(z, t):  # dies in the middle of the second epoch (6 steps per epoch)
        calls["n"] += 1
        if calls["n"] == 9:
            raise Interrupt
        return F.cross_entropy(z, t)

    with pytest.raises(Interrupt):
        fit(_net(), x, y, CFG, tmp_path / "cut", seed=0, device=CPU, loss_fn=dying_loss, val=(x, y))
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["epoch"] == 1

    resumed = _net(seed=123)  # a fresh process would build a differently initialised net: the checkpoint wins
    hist = fit(resumed, x, y, CFG, tmp_path / "cut", seed=0, device=CPU, val=(x, y))
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert [r["train_loss"] for r in hist] == [r["train_loss"] for r in hist_full]


def test_checkpoint_of_another_config_is_not_resumed(tmp_path, capsys):
    x, y = _problem()
    fit(_net(), x, y, CFG, tmp_path, seed=0, device=CPU)
    net = _net()
    fit(net, x, y, TrainConfig(epochs=2, batch_size=16), tmp_path, seed=0, device=CPU)
    assert "belongs to another training" in capsys.readouterr().out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_corrupt_checkpoint_restarts_the_training_with_a_warning_naming_it(tmp_path, capsys):
    """Issue 21: it was an error that asked the user to delete the file."""
    x, y = _problem()
    fresh = _net()
    fit(fresh, x, y, CFG, tmp_path / "fresh", seed=0, device=CPU)
    (tmp_path / CHECKPOINT).write_bytes(b"garbage")
    net = _net()
    fit(net, x, y, CFG, tmp_path, seed=0, device=CPU)
    assert f"warning: checkpoint {tmp_path / CHECKPOINT} is corrupt or not ours" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(_weights(net).values(), _weights(fresh).values()))


def test_soft_targets_and_custom_loss(tmp_path):
    x, y = _problem()
    soft = F.one_hot(y, 4).float() * 0.9 + 0.025
    loss = lambda z, t: -(t * z.log_softmax(1)).sum(1).mean()  # noqa: E731
    hist = fit(_net(), x, soft, TrainConfig(epochs=4, batch_size=16, lr=1e-2), tmp_path, seed=0, device=CPU,
               loss_fn=loss)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_learns_a_separable_problem(tmp_path):
    x, y = _problem()
    hist = fit(_net(), x, y, TrainConfig(epochs=8, batch_size=16, lr=1e-2, augment="none"), tmp_path,
               seed=0, device=CPU, val=(x, y))
    assert hist[-1]["val_top1"] > 0.9


def test_lr_schedule_warmup_then_cosine():
    f = _lr_lambda(TrainConfig(epochs=10, warmup_epochs=1.0, schedule="cosine"), 10, lambda: 0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    g = _lr_lambda(TrainConfig(epochs=10, warmup_epochs=0.0, schedule="constant"), 10, lambda: 0)
    assert g(0) == g(99) == 1.0


def test_augment_shift_moves_images_and_none_is_identity():
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1
    gen = torch.Generator().manual_seed(0)
    assert augment(x, "none", gen) is x
    for kind in ("shift", "affine"):
        out = augment(x, kind, gen)
        assert out.shape == x.shape
        assert not torch.allclose(out, x)
        assert out.sum(dim=(1, 2, 3)).sub(64).abs().max() < 16  # ink is moved (and scaled), not lost


def test_predictions_are_float32_without_mixed_precision_or_tf32(monkeypatch):
    """Issue 23: predictions ran under bf16 autocast on CUDA even with amp off; they feed the clustering,
    the evaluation and the Combiner, which must agree with each other on every device."""
    from ensemble import train

    monkeypatch.setattr(train, "_amp", lambda *a: pytest.fail("predictions asked for mixed precision"))
    entered = []
    exact = train.exact_float32
    monkeypatch.setattr(train, "exact_float32", lambda device: entered.append(device) or exact(device))
    x, _ = _problem(n=8)
    assert train.predict_logits(_net(), x, device=CPU).dtype == torch.float32
    assert entered == [CPU]
    monkeypatch.undo()
    autocast, scaler = train._amp(torch.device("cuda"), False)  # training with amp off on a GPU: plain float32
    assert not scaler.is_enabled() and not isinstance(autocast(), torch.autocast)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.conv.fp32_precision, matmul.fp32_precision)
    with train.exact_float32(torch.device("cuda")):  # no TF32 in convolutions or matrix products
        assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision) == ("ieee",) * 3
    assert (cudnn.conv.fp32_precision, matmul.fp32_precision) == before


def test_predictions_of_several_nets_read_each_batch_once_and_equal_their_own(monkeypatch):
    """The combiner's specialists on a streamed test set: one decoding of each batch for all of them."""
    from ensemble import train

    x, _ = _problem(n=40)
    nets = [_net(seed=s) for s in range(3)]
    reads = []
    real = train.image_batches
    monkeypatch.setattr(train, "image_batches", lambda *a, **k: reads.append(1) or real(*a, **k))
    together = train.predict_logits_of(nets, x, device=CPU, batch_size=16)
    assert len(reads) == 1
    for net, z in zip(nets, together):
        assert torch.equal(z, train.predict_logits(net, x, device=CPU, batch_size=16))


def test_the_validation_in_fit_builds_no_autograd_graph(monkeypatch):
    """`evaluate` reads the same prediction batches as `predict_logits`: under no_grad, not recording
    every validation batch for a backward pass that never comes."""
    from ensemble import train

    seen = []
    real = train.classification_sums
    monkeypatch.setattr(train, "classification_sums", lambda z, y: seen.append(z.requires_grad) or real(z, y))
    x, y = _problem(n=32)
    train.evaluate(_net(), x, y, device=CPU, batch_size=16)
    assert seen == [False, False]


def _history(scores):
    return [{"epoch": i + 1, "val_top1": v} for i, v in enumerate(scores)]


def test_plateau_replays_the_validation_curve():
    """Issue 26: `epochs: auto` stops at the first stall of `patience` epochs without a strictly better
    validation top-1; `schedule: plateau` first divides the learning rate by 10 at each of LR_DROPS stalls."""
    auto = TrainConfig(epochs="auto", patience=2)
    state = plateau(_history([0.1, 0.3, 0.3, 0.2]), auto)  # a tie is no improvement
    assert (state.best_epoch, state.drops, state.stop) == (2, 0, True)
    state = plateau(_history([0.1, 0.3, 0.3, 0.4, 0.2]), auto)
    assert (state.best_epoch, state.drops, state.stop) == (4, 0, False)
    drops = TrainConfig(epochs="auto", patience=2, schedule="plateau")
    curve = [0.1, 0.3, 0.2, 0.2, 0.35, 0.3, 0.3, 0.3, 0.3]  # stalls end at epochs 4, 7 and 9
    assert LR_DROPS == 2
    assert [plateau(_history(curve[:n]), drops).drops for n in range(1, 10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [plateau(_history(curve[:n]), drops).stop for n in range(1, 10)] == [False] * 8 + [True]
    fixed = TrainConfig(epochs=9, patience=2, schedule="plateau")  # the drops, never a stop
    assert plateau(_history(curve), fixed) == type(state)(5, 2, False)
    assert plateau(_history(curve), TrainConfig(epochs=9, patience=2)) == type(state)(0, 0, False)


def test_smooth_epochs_lets_a_lucky_epoch_pass_and_still_stalls_on_a_flat_curve():
    """One epoch far above the trend stalls the raw curve for `patience` epochs; the mean of the last
    `smooth_epochs` epochs keeps rising with the trend, so it cuts nothing, and stalls where the curve goes
    flat. The kept epoch is the best single one."""
    curve = [0.50, 0.55, 0.75, 0.58, 0.60, 0.62, 0.64, 0.66, 0.66, 0.66, 0.66, 0.66, 0.66]  # epoch 3 lucky
    raw = TrainConfig(epochs="auto", patience=4, schedule="plateau")
    assert [plateau(_history(curve[:n]), raw).drops for n in (6, 7)] == [0, 1]  # epochs 4-7 stall below 0.75
    smooth = TrainConfig(epochs="auto", patience=4, schedule="plateau", smooth_epochs=3)
    means = [sum(curve[max(0, i - 2):i + 1]) / len(curve[max(0, i - 2):i + 1]) for i in range(len(curve))]
    assert [round(m, 4) for m in means[3:9]] == [0.6267, 0.6433, 0.6, 0.62, 0.64, 0.6533]  # the lucky one leaves
    # its window at epoch 6; the mean passes its high of epoch 5 (0.6433) at epoch 9, after 3 epochs below it
    states = [plateau(_history(curve[:n]), smooth) for n in range(1, len(curve) + 1)]
    assert [s.drops for s in states] == [0] * 13  # the mean's best is epoch 10's (0.66): no 4 epochs since
    assert states[-1].best_epoch == 3  # the highest single epoch's weights are kept
    longer = _history(curve + [0.66] * 2)  # epochs 11-14 tie epoch 10's mean: a stall at epoch 14
    assert plateau(longer[:13], smooth).drops == 0 and plateau(longer[:14], smooth).drops == 1


def _noisy_val(n=64):
    """Validation labels the net cannot learn: its validation top-1 wanders and stalls."""
    x, _ = _problem(n)
    return x, torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(5))


AUTO = TrainConfig(epochs="auto", patience=2, max_epochs=12, batch_size=16, augment="none", lr=1e-2)


def test_epochs_auto_stops_at_a_stall_and_keeps_the_best_epochs_weights(tmp_path):
    x, y = _problem()
    snapshots = {}
    net = _net()
    hist = fit(net, x, y, AUTO, tmp_path, seed=0, device=CPU, val=_noisy_val(),
               on_epoch=lambda h: snapshots.update({len(h): _weights(net)}))
    state = plateau(hist, AUTO)
    assert state.stop and len(hist) == state.best_epoch + AUTO.patience < AUTO.max_epochs
    best, final = snapshots[state.best_epoch], _weights(net)
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert not all(torch.equal(snapshots[len(hist)][k], final[k]) for k in final)  # not the last epoch's
    again = _net(seed=7)  # a finished training is read back, best weights and all
    key = training_key(AUTO, 0, len(x), y)
    assert finished_history(again, tmp_path / CHECKPOINT, key, AUTO) == hist
    assert all(torch.equal(v, final[k]) for k, v in _weights(again).items())


def test_an_interrupted_auto_training_resumes_to_the_same_stop_and_weights(tmp_path):
    x, y = _problem()
    val = _noisy_val()
    cfg = TrainConfig(epochs="auto", patience=2, max_epochs=12, batch_size=16, augment="none", lr=1e-2,
                      schedule="plateau")
    full = _net()
    hist_full = fit(full, x, y, cfg, tmp_path / "full", seed=0, device=CPU, val=val)
    assert plateau(hist_full, cfg).drops >= 1  # the cut below falls after a drop of the learning rate
    cut_at = 6 * (len(hist_full) - 1) + 3  # a step in the last epoch
    calls = {"n": 0}

    def dying_loss(z, t):
        calls["n"] += 1
        if calls["n"] == cut_at:
            raise Interrupt
        return F.cross_entropy(z, t)

    with pytest.raises(Interrupt):
        fit(_net(), x, y, cfg, tmp_path / "cut", seed=0, device=CPU, loss_fn=dying_loss, val=val)
    resumed = _net(seed=123)
    hist = fit(resumed, x, y, cfg, tmp_path / "cut", seed=0, device=CPU, val=val)
    assert [r["train_loss"] for r in hist] == [r["train_loss"] for r in hist_full]
    assert [r["lr"] for r in hist] == [r["lr"] for r in hist_full]
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_plateau_schedule_divides_the_learning_rate_by_ten_at_each_stall_and_keeps_the_best_epoch(tmp_path):
    x, y = _problem()
    cfg = TrainConfig(epochs=10, patience=2, batch_size=16, augment="none", lr=1e-2, warmup_epochs=0,
                      schedule="plateau")
    snapshots = {}
    net = _net()
    hist = fit(net, x, y, cfg, tmp_path, seed=0, device=CPU, val=_noisy_val(),
               on_epoch=lambda h: snapshots.update({len(h): _weights(net)}))
    for n in range(1, len(hist) + 1):  # each epoch's last step ran at the rate its history up to then set
        assert hist[n - 1]["lr"] == pytest.approx(1e-2 * 0.1 ** plateau(hist[:n - 1], cfg).drops)
    assert plateau(hist, cfg).drops >= 1
    # it runs all its epochs and, following the validation top-1, keeps the best epoch's weights, not the last
    best = kept_epoch(hist, cfg)
    assert len(hist) == cfg.epochs and best == plateau(hist, cfg).best_epoch < len(hist)
    final = _weights(net)
    assert all(torch.equal(snapshots[best][k], final[k]) for k in final)
    again = _net(seed=7)
    assert finished_history(again, tmp_path / CHECKPOINT, training_key(cfg, 0, len(x), y), cfg) == hist
    assert all(torch.equal(v, final[k]) for k, v in _weights(again).items())
    # a checkpoint from before this rule has no best weights: not taken as finished, and trained again
    old = load_checkpoint(tmp_path / CHECKPOINT)
    del old["best"]
    save_checkpoint(tmp_path / CHECKPOINT, old)
    assert finished_history(_net(seed=7), tmp_path / CHECKPOINT, training_key(cfg, 0, len(x), y), cfg) is None
    redone = _net()
    again_hist = fit(redone, x, y, cfg, tmp_path, seed=0, device=CPU, val=_noisy_val())
    assert [r["train_loss"] for r in again_hist] == [r["train_loss"] for r in hist]  # all its epochs, afresh
    assert all(torch.equal(v, final[k]) for k, v in _weights(redone).items())


def test_auto_without_validation_images_is_an_error_naming_it(tmp_path):
    x, y = _problem()
    with pytest.raises(ValueError, match="epochs: auto and schedule: plateau follow the validation top-1"):
        fit(_net(), x, y, AUTO, tmp_path, seed=0, device=CPU, desc="specialist m000")
