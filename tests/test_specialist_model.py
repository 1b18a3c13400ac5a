"""The specialist network, its data, and the dustbin correction (no launcher involved)."""
import math

import pytest
import torch

from ensemble.config import Config, NetConfig, TrainConfig
from ensemble.data import Data
from ensemble.launch import CheckpointStore
from ensemble.nets import build_net
from ensemble.train import fit, predict_logits
from specialists.heads import (
    FullSoftmax,
    FullSoftmaxHead,
    collapse,
    dustbin_correction,
    outside_distillation_loss,
    specialist_net,
)
from specialists.sampling import local_labels, subset_sampler
from specialists.task import Job, train_specialist

CPU = torch.device("cpu")


def _trained_generalist(tmp_path, x, y, classes, epochs=4):
    net = build_net(NetConfig(name="mlp", width=32), tuple(x.shape[1:]), classes)
    net.set_input_stats(x)
    fit(net, x, y, TrainConfig(epochs=epochs, batch_size=64, augment="none"), tmp_path / "g", seed=0, device=CPU)
    return net.eval()


def _data(x, y, x_val, y_val, x_test, y_test):
    return Data(x, y, x_val, y_val, x_test, y_test, class_names=[str(c) for c in range(10)])


def _blobs(n_per_class, classes=10, spread=0.55, seed=0):
    """uint8 'images' (1×4×4) of overlapping Gaussian classes (the same classes whatever the seed): a
    problem with real uncertainty."""
    means = torch.randn(classes, 16, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = means[y] * spread + torch.randn(len(y), 16, generator=g)
    return (x * 40 + 128).clamp(0, 255).to(torch.uint8).view(-1, 1, 4, 4), y


def test_specialist_copies_trunk_and_rows_and_fits_the_dustbin(tmp_path):
    x, y = _blobs(100)
    gen = _trained_generalist(tmp_path, x, y, 10)
    subset = torch.tensor([7, 2, 5])
    with torch.no_grad():
        feats = gen.features(x.float() / 255)
    spec = specialist_net(gen, subset, feats)
    assert spec.head.out_features == 4
    assert all(torch.equal(a, b) for a, b in zip(spec.trunk.state_dict().values(), gen.trunk.state_dict().values()))
    assert torch.equal(spec.head.weight[:3], gen.head.weight[subset])  # rows in the subset's order
    assert torch.equal(spec.head.bias[:3], gen.head.bias[subset])

    # The dustbin row minimises a convex loss: its gradient there is zero, and the initial dustbin
    # probability matches the generalist's mass outside the subset on fresh inputs.
    w, b = gen.head.weight.detach(), gen.head.bias.detach()
    row = torch.cat([spec.head.weight[-1], spec.head.bias[-1:]]).detach().double().requires_grad_(True)
    z = feats.double() @ w.double().T + b.double()
    target = collapse(z.softmax(1), subset)
    logits = torch.cat([z[:, subset], (feats.double() @ row[:-1] + row[-1])[:, None]], dim=1)
    loss = -(target * logits.log_softmax(1)).sum(1).mean()
    (grad,) = torch.autograd.grad(loss, row)
    assert grad.abs().max() < 1e-5

    x_new, _ = _blobs(100, seed=1)
    with torch.no_grad():
        p_gen = collapse(gen(x_new.float() / 255).softmax(1), subset)[:, -1]
        p_spec = spec(x_new.float() / 255).softmax(1)[:, -1]
    assert abs(p_spec.mean() - p_gen.mean()) < 0.01
    assert (p_spec - p_gen).abs().mean() < 0.05


def test_local_labels_put_other_classes_in_the_dustbin():
    y = torch.tensor([0, 3, 5, 9, 3])
    assert local_labels(y, torch.tensor([3, 9]), 10).tolist() == [2, 0, 2, 1, 0]


def test_sampler_fills_every_batch_with_the_in_subset_share():
    in_subset = torch.zeros(1000, dtype=torch.bool)
    in_subset[:130] = True
    sample = subset_sampler(in_subset, batch_size=32, rho=0.25)
    order = sample(torch.Generator().manual_seed(0))
    batches = order.view(-1, 32)
    assert len(batches) == math.ceil(130 / 8)
    assert (in_subset[batches].sum(1) == 8).all()  # every batch: exactly rho of its examples from the subset
    assert set(order[in_subset[order]].tolist()) == set(range(130))  # an epoch sees every subset example
    outside = order[~in_subset[order]]
    assert len(set(outside.tolist())) == len(outside)  # outside examples do not repeat while the pool lasts
    assert torch.equal(order, sample(torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="leaves no room"):
        subset_sampler(in_subset, batch_size=32, rho=1.0)


def test_dustbin_correction_is_the_prior_ratio():
    assert dustbin_correction(0.5, 0.5) == 0
    assert dustbin_correction(0.2, 0.5) == pytest.approx(math.log(4))
    assert dustbin_correction(0.1, 0.25) == pytest.approx(math.log(9) - math.log(3))
    with pytest.raises(ValueError, match="in-subset shares"):
        dustbin_correction(0.0, 0.5)


def _trained_at_natural_share(tmp_path, head):
    """A specialist (`head`) of the subset {1, 4}, natural share 0.2, trained at rho = 0.5 without the
    selection on validation: the generalist, the task's result and the test images."""
    x, y = _blobs(400)
    x_test, y_test = _blobs(300, seed=1)
    gen = _trained_generalist(tmp_path, x, y, 10)
    cfg = Config()
    cfg.generalist.net = NetConfig(name="mlp", width=32)
    cfg.specialists.head = head
    cfg.specialists.train = TrainConfig(epochs=6, batch_size=64, lr=2e-3, augment="none")
    cfg.specialists.select_on_validation = False
    data = _data(x, y, x_test, y_test, x_test, y_test)
    return gen, train_specialist(Job(0, (1, 4)), None, CheckpointStore(tmp_path / "s"), CPU, gen.state_dict(),
                                 data, cfg), x_test


def test_corrected_dustbin_matches_the_natural_share_and_uncorrected_does_not(tmp_path):
    """Trained at rho = 0.5 on a subset whose natural share is 0.2, the specialist over-predicts the
    subset; the prior correction makes its mean dustbin probability on natural data the true 0.8."""
    gen, result, x_test = _trained_at_natural_share(tmp_path, "dustbin")
    m = result.metrics
    assert m["kept"] == "trained"
    assert m["natural_share"] == pytest.approx(0.2) and m["dustbin_true_share"] == pytest.approx(0.8)
    assert m["dustbin_shift"] == pytest.approx(math.log(4))
    assert abs(m["dustbin_mean_prob"] - 0.8) < 0.03
    assert m["dustbin_mean_prob_uncorrected"] < 0.8 - 0.08
    # the returned weights carry the correction: the model itself predicts the natural share
    spec = specialist_net(gen, torch.tensor([1, 4]), torch.zeros(1, 32))
    spec.load_state_dict(result.weights)
    p_bin = predict_logits(spec, x_test, device=CPU).softmax(1)[:, -1]
    assert p_bin.mean().item() == pytest.approx(m["dustbin_mean_prob"], abs=1e-5)


@pytest.mark.parametrize("lr, kept", [(0.0, "start"), (2e-3, "trained")])
def test_specialist_keeps_its_start_unless_training_beats_it_on_validation(tmp_path, lr, kept):
    """Untrained (lr 0), the specialist ties its start on validation and returns the start, uncorrected:
    on its subset it then predicts exactly as the generalist. A weak generalist (1 epoch) leaves room
    that training fills, and the trained weights are kept."""
    x, y = _blobs(200)
    x_val, y_val = _blobs(60, seed=2)
    x_test, y_test = _blobs(100, seed=1)
    gen = _trained_generalist(tmp_path, x, y, 10, epochs=1)
    cfg = Config()
    cfg.generalist.net = NetConfig(name="mlp", width=32)
    cfg.specialists.train = TrainConfig(epochs=4, batch_size=64, lr=lr, augment="none")
    data = _data(x, y, x_val, y_val, x_test, y_test)
    subset = torch.tensor([1, 4, 6])
    m = train_specialist(Job(0, tuple(subset.tolist())), None, CheckpointStore(tmp_path / "s"), CPU,
                         gen.state_dict(), data, cfg).metrics
    assert m["kept"] == kept
    if kept == "start":
        assert m["val_conditional_top1_trained"] == m["val_conditional_top1_start"] and m["dustbin_shift"] == 0
        inside = torch.isin(y_test, subset)
        general = subset[predict_logits(gen, x_test[inside], device=CPU)[:, subset].argmax(1)]
        assert m["conditional_top1"] == pytest.approx((general == y_test[inside]).float().mean().item(), abs=1e-7)
    else:
        assert m["val_conditional_top1_trained"] > m["val_conditional_top1_start"] and m["dustbin_shift"] != 0


def test_full_softmax_is_seen_as_the_collapsed_distribution_and_its_correction_shifts_the_dustbin(tmp_path):
    x, y = _blobs(50)
    gen = _trained_generalist(tmp_path, x, y, 10, epochs=1)
    subset = torch.tensor([7, 2, 5])
    spec = FullSoftmax(gen, subset).eval()
    # the logits are float32 (the nets'): compared with float32's tolerances, however they are combined
    p = predict_logits(gen, x, device=CPU).double().softmax(1)
    z = predict_logits(spec, x, device=CPU)
    torch.testing.assert_close(z.softmax(1), collapse(p, subset).float())
    FullSoftmaxHead(subset, hidden=0).shift_dustbin(spec, 1.5)
    shifted = predict_logits(spec, x, device=CPU)
    torch.testing.assert_close(shifted[:, -1] - z[:, -1], torch.full((len(x),), 1.5))
    torch.testing.assert_close(shifted[:, :-1], z[:, :-1])
    assert set(spec.state_dict()) == {f"net.{k}" for k in gen.state_dict()}  # the subset is not saved


def test_outside_distillation_loss_against_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g).log_softmax(1)
    labels, outside = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 3, 4])
    expected = 0.0
    for z, t, label in zip(logits.tolist(), teacher.tolist(), labels.tolist()):
        expected += -z[label] + math.log(sum(math.exp(v) for v in z))  # cross-entropy over all classes
        zo, to = [z[c] for c in outside], [math.exp(t[c]) for c in outside]
        q = [math.exp(v) / sum(math.exp(u) for u in zo) for v in zo]
        p = [v / sum(to) for v in to]  # the teacher renormalised outside the subset
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert outside_distillation_loss(logits, labels, teacher, outside).item() == pytest.approx(expected / 6, rel=1e-5)


def test_full_softmax_specialist_trains_keeps_the_outside_and_is_corrected(tmp_path):
    """§6.1: trained on hard labels plus the generalist's soft targets outside the subset, the specialist
    still predicts the natural share of its dustbin after the prior correction, and its returned weights
    are a full net that, wrapped again, gives the metrics' predictions."""
    gen, result, x_test = _trained_at_natural_share(tmp_path, "full")
    m = result.metrics
    assert m["dustbin_shift"] == pytest.approx(math.log(4))
    assert abs(m["dustbin_mean_prob"] - 0.8) < 0.03 and m["dustbin_mean_prob_uncorrected"] < 0.8 - 0.08
    net = build_net(NetConfig(name="mlp", width=32), (1, 4, 4), 10)
    net.load_state_dict(result.weights)
    p_bin = predict_logits(FullSoftmax(net, torch.tensor([1, 4])), x_test, device=CPU).softmax(1)[:, -1]
    assert p_bin.mean().item() == pytest.approx(m["dustbin_mean_prob"], abs=1e-5)
    # outside the subset it stays close to the generalist: test KL 0.024 here, against 0.062 when the
    # same specialist is trained on the hard labels alone
    out = torch.tensor([c for c in range(10) if c not in (1, 4)])
    z_spec, z_gen = predict_logits(net, x_test, device=CPU)[:, out], predict_logits(gen, x_test, device=CPU)[:, out]
    kl = torch.nn.functional.kl_div(z_spec.log_softmax(1), z_gen.log_softmax(1), log_target=True, reduction="batchmean")
    assert kl < 0.04


def test_dustbin_correction_modes_and_the_choice_on_validation():
    from specialists.task import choose_shift

    y = torch.tensor([0, 2, 2, 2])  # three of four validation examples in the dustbin (local label 2)
    z = torch.zeros(4, 3)  # the dustbin at 1/3: too low; raising its logit helps, lowering it hurts
    assert choose_shift("prior", -1.0, z, y) == -1.0 and choose_shift("none", -1.0, z, y) == 0.0
    assert choose_shift("validation", -1.0, z, y) == 0.0
    assert choose_shift("validation", 1.0, z, y) == 1.0


def test_skip_largest_leaves_the_largest_subsets_to_the_generalist():
    from specialists.stage import skip_largest

    subsets = [[0, 1], [2, 3, 4, 5], [6], [7, 8, 9, 10]]
    assert skip_largest(subsets, 0) == (subsets, [])
    assert skip_largest(subsets, 1) == ([[0, 1], [2, 3, 4, 5], [6]], [[7, 8, 9, 10]])
    assert skip_largest(subsets, 2) == ([[0, 1], [6]], [[2, 3, 4, 5], [7, 8, 9, 10]])
    with pytest.raises(ValueError, match="skip_largest must be in"):
        skip_largest(subsets, 4)


def test_a_frozen_trunk_keeps_the_generalists_weights_and_batch_norm_statistics(tmp_path):
    x, y = _blobs(100)
    x = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 16x16: room for the CNN's pooling
    cfg = Config()
    cfg.generalist.net = NetConfig(name="cnn", width=4)
    gen = build_net(cfg.generalist.net, (1, 16, 16), 10)
    gen.set_input_stats(x)
    fit(gen, x, y, TrainConfig(epochs=1, batch_size=64, augment="none"), tmp_path / "g", seed=0, device=CPU)
    cfg.specialists.train = TrainConfig(epochs=2, batch_size=64, augment="none")
    cfg.specialists.select_on_validation = False
    data = _data(x, y, x, y, x, y)
    for freeze in (True, False):
        cfg.specialists.freeze_trunk = freeze
        state = train_specialist(Job(0, (1, 4)), None, CheckpointStore(tmp_path / f"s{freeze}"), CPU,
                                 gen.state_dict(), data, cfg).weights
        same = [torch.equal(state[k], v) for k, v in gen.state_dict().items() if k.startswith("trunk.")]
        assert all(same) if freeze else not any(same[:2])  # the first conv and BN weights move when trained
        assert not torch.equal(state["head.bias"][:2], gen.state_dict()["head.bias"][[1, 4]])  # the head learns


@pytest.mark.parametrize("name, shape", [("mlp", (1, 4, 4)), ("cnn", (1, 16, 16)), ("resnet", (1, 16, 16))])
def test_widen_computes_what_the_narrow_net_computes(name, shape):
    from specialists.heads import widen

    torch.manual_seed(0)
    narrow = build_net(NetConfig(name=name, width=4, depth=2), shape, 7).eval()
    with torch.no_grad():  # batch-norm statistics that are not the defaults
        for m in narrow.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    wide = widen(narrow, build_net(NetConfig(name=name, width=12, depth=2), shape, 7)).eval()
    x = torch.rand(5, *shape)
    torch.testing.assert_close(wide(x), narrow(x))
    with pytest.raises(ValueError, match="cannot widen"):
        widen(wide, build_net(NetConfig(name=name, width=4, depth=2), shape, 7))


def test_wider_specialists_train_and_load_as_the_ensemble(upstream, tmp_path):
    """specialists.width: trained from the widened generalist, saved and rebuilt at their own width."""
    from conftest import specialists_run

    from combiner import load_ensemble
    from ensemble.pipeline import run_pipeline

    cfg = specialists_run(upstream, tmp_path, "specialists.width=96", "specialists.select_on_validation=false")
    run_pipeline(cfg, only="specialists")
    ensemble = load_ensemble(cfg.run_dir, cfg)
    generalist, nets = ensemble.generalist, ensemble.specialists
    assert all(net.head.in_features == 96 for net in nets) and generalist.head.in_features == 64
    with pytest.raises(ValueError, match="below the generalist's width"):
        run_pipeline(specialists_run(upstream, tmp_path, "specialists.width=32", name="narrow"))


def test_a_residual_head_starts_as_the_linear_head_and_learns_its_own_layer():
    from specialists.heads import ResidualHead

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    head = ResidualHead(linear, hidden=5)
    h = torch.randn(8, 6)
    torch.testing.assert_close(head(h), linear(h), rtol=0, atol=0)
    head(h).square().sum().backward()
    assert head.out.weight.grad.abs().sum() > 0  # the zero output layer gets a gradient, so it grows
    with torch.no_grad():
        head.out.weight.fill_(0.1)
    expected = linear(h) + 0.1 * torch.relu(h @ head.hidden.weight.T + head.hidden.bias).sum(dim=1, keepdim=True)
    torch.testing.assert_close(head(h), expected)


@pytest.mark.parametrize("head", ["dustbin", "full"])
def test_specialists_with_their_own_head_on_a_shared_trunk_train_and_load_as_the_ensemble(upstream, tmp_path, head):
    """specialists.head_hidden with freeze_trunk: the trunk stays the generalist's; the saved head holds a
    trained hidden layer, and the ensemble rebuilds it."""
    from conftest import specialists_run

    from combiner import load_ensemble
    from ensemble.pipeline import run_pipeline
    from ensemble.rundir import load_tensors
    from specialists.heads import FullSoftmax, ResidualHead

    cfg = specialists_run(upstream, tmp_path, "specialists.head_hidden=16", "specialists.freeze_trunk=true",
                          f"specialists.head={head}", "specialists.select_on_validation=false")
    run_pipeline(cfg, only="specialists")
    ensemble = load_ensemble(cfg.run_dir, cfg)
    generalist, nets, subsets = ensemble.generalist, ensemble.specialists, ensemble.subsets
    for net, subset in zip(nets, subsets):
        inner = net.net if isinstance(net, FullSoftmax) else net
        assert isinstance(inner.head, ResidualHead) and inner.head.hidden.out_features == 16
        assert inner.head.out.weight.abs().sum() > 0
        for key, value in generalist.trunk.state_dict().items():
            torch.testing.assert_close(inner.trunk.state_dict()[key], value, rtol=0, atol=0)
    saved = load_tensors(cfg.run_dir / "specialists" / "m000" / "model.safetensors")
    assert {"head.hidden.weight", "head.out.weight"} <= set(saved)
    with pytest.raises(ValueError, match="'specialists.head_hidden' must be >= 0"):
        run_pipeline(specialists_run(upstream, tmp_path, "specialists.head_hidden=-1", name="negative"))
