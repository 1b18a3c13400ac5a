"""Issue 26: branch specialists. They share the generalist's first blocks (`specialists.branch_at`),
train only the blocks after them, and the Combiner runs the shared part once per example."""
import copy
import json
import re

import pytest
import torch
from conftest import specialists_run

from combiner import Combiner, load_ensemble
from ensemble.config import Config, NetConfig, TrainConfig, load_config
from ensemble.cost import multiply_adds
from ensemble.data import Data
from ensemble.launch import CheckpointStore
from ensemble.nets import block_count, build_net
from ensemble.pipeline import run_pipeline
from ensemble.train import fit
from specialists.branches import freeze_front, shared_blocks
from specialists.heads import make_head
from specialists.task import Job, train_specialist

CPU = torch.device("cpu")


def _with_statistics(net):
    """`net` in eval mode with batch-norm statistics that are not the defaults."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net.eval()


@pytest.mark.parametrize("name, depth, shape", [("mlp", 3, (1, 4, 4)), ("cnn", 1, (1, 16, 16)),
                                                ("resnet", 2, (3, 16, 16))])
def test_the_blocks_after_the_first_k_finish_what_the_first_k_began(name, depth, shape):
    torch.manual_seed(0)
    cfg = NetConfig(name=name, width=4, depth=depth)
    net = _with_statistics(build_net(cfg, shape, 7))
    x = torch.rand(5, *shape)
    assert net.num_blocks == block_count(cfg) == {"mlp": 3, "cnn": 4, "resnet": 3}[name]
    for k in range(net.num_blocks + 1):
        assert torch.equal(net.back(net.front(x, k), k), net(x))
    assert torch.equal(net.front(x, net.num_blocks), net.features(x))  # all the blocks: the trunk
    with pytest.raises(ValueError, match=f"this net has {net.num_blocks} blocks"):
        net.front(x, net.num_blocks + 1)


def test_a_torchvision_net_is_cut_after_a_named_module():
    """`branch_at: layer3` on a torchvision ResNet: the front runs the model up to layer3's output, the back
    the rest; both share the net's layers (a copy's split runs the copy's), and a name that is no place to
    cut is an error saying why."""
    torch.manual_seed(0)
    net = _with_statistics(build_net(NetConfig(name="torchvision:resnet18"), (3, 32, 32), 7))
    x = torch.rand(3, 3, 32, 32)
    for name in ("conv1", "layer1", "layer3", "layer4.1", "avgpool"):
        assert torch.equal(net.back(net.front(x, name), name), net(x))
    front, back = net.blocks("layer3")
    assert net.front(x, "layer3").shape == (3, 256, 2, 2)
    assert {id(p) for p in front.parameters()} == {id(p) for name, p in net.trunk.named_parameters()
                                                    if name.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3")}
    assert {id(p) for p in back.parameters()} == {id(p) for p in net.trunk.layer4.parameters()}
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.trunk.layer2[0].conv1.weight.mul_(2)
    assert torch.equal(twin.back(twin.front(x, "layer3"), "layer3"), twin(x)) and not torch.equal(twin(x), net(x))
    for name, message in [("layer5", "the model has no module 'layer5' (did you mean layer4"),
                          ("layer3.0.conv1", "layer3.0.conv1 is not a place to cut the model: layer3.0.downsample.0 "
                                             "after it also reads layer2.1.relu, from before it"),
                          ("layer1.0.relu", "layer1.0.relu runs 2 times in the model's forward pass")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            net.blocks(name)
    with pytest.raises(ValueError, match=re.escape("a built-in net is cut after a number of blocks (0 to 4)")):
        build_net(NetConfig(name="cnn", width=4), (1, 16, 16), 7).blocks("trunk.3")


def _images(n_per_class=60, classes=10):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    means = torch.rand(classes, 1, 4, 4, generator=g) * 200
    x = (means[y] + torch.randn(len(y), 1, 4, 4, generator=g) * 40).clamp(0, 255)
    x = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 16x16: room for the CNN's pooling
    return x.to(torch.uint8), y


def test_a_branch_specialist_starts_as_the_generalist_and_trains_only_the_blocks_after_the_shared_ones(tmp_path):
    x, y = _images()
    cfg = Config()
    cfg.generalist.net = NetConfig(name="cnn", width=4)
    gen = build_net(cfg.generalist.net, (1, 16, 16), 10)
    gen.set_input_stats(x)
    fit(gen, x, y, TrainConfig(epochs=1, batch_size=64, augment="none"), tmp_path / "g", seed=0, device=CPU)
    gen.eval()
    subset = torch.tensor([1, 4, 7])
    cfg.specialists.branch_at = 2

    start, _ = make_head(cfg.specialists, subset).start(gen, x, CPU, 64, seed=0)
    freeze_front(start, 2)
    start.train()  # the shared blocks stay in eval mode: their batch norm keeps the generalist's statistics
    xf = x[:40].float() / 255
    assert torch.equal(start.front(xf, 2), gen.front(xf, 2))
    start.eval()
    assert torch.equal(start(xf)[:, :3], gen(xf)[:, subset])  # before training: the generalist, exactly

    cfg.specialists.train = TrainConfig(epochs=2, batch_size=64, augment="none")
    cfg.specialists.select_on_validation = False
    data = Data(x, y, x, y, x, y, class_names=[str(c) for c in range(10)])
    state = train_specialist(Job(0, tuple(subset.tolist())), None, CheckpointStore(tmp_path / "s"), CPU,
                             gen.state_dict(), data, cfg).weights
    end = gen.block_ends[1]
    shared = [k for k in gen.state_dict() if k.startswith("trunk.") and int(k.split(".")[1]) < end]
    own = [k for k in gen.state_dict() if k.startswith("trunk.") and int(k.split(".")[1]) >= end
           and k.endswith("weight")]
    assert shared and all(torch.equal(state[k], gen.state_dict()[k]) for k in shared)  # running statistics too
    assert own and not any(torch.equal(state[k], gen.state_dict()[k]) for k in own)  # its own blocks learn


def _mlp_ensemble(width=6, classes=12, subsets=((0, 1, 2), (2, 3, 4, 5), (6, 7)), shared=1):
    """A generalist MLP of 2 hidden layers on 1x4x4 images and specialists that share its first `shared`
    layers, their later layers and heads their own."""
    torch.manual_seed(0)
    gen = build_net(NetConfig(name="mlp", width=width, depth=2), (1, 4, 4), classes).eval()
    nets = []
    for s in subsets:
        net = copy.deepcopy(gen)
        net.head = torch.nn.Linear(width, len(s) + 1)
        own = net.blocks(shared)[1]
        with torch.no_grad():
            for p in own.parameters():
                p.add_(torch.randn_like(p))
        nets.append(net.eval())
    return gen, nets, [list(s) for s in subsets]


def test_the_combiner_runs_the_shared_blocks_once_per_example_and_counts_only_the_branches():
    width, classes = 6, 12
    gen, nets, subsets = _mlp_ensemble(width, classes)
    x = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8)
    calls = {"generalist": 0, "specialists": 0, "branches": 0}
    gen.trunk[1].register_forward_hook(lambda m, a, o: calls.__setitem__("generalist", calls["generalist"] + len(a[0])))
    for net in nets:
        net.trunk[1].register_forward_hook(lambda m, a, o: calls.__setitem__("specialists", calls["specialists"] + 1))
        net.trunk[4].register_forward_hook(lambda m, a, o: calls.__setitem__("branches", calls["branches"] + len(a[0])))
    shared = Combiner(gen, nets, subsets, top_n=2, method="fixed_point", shared_blocks=1, input_shape=(1, 4, 4))
    p, outputs = shared.outputs(x)
    assert calls == {"generalist": 64, "specialists": 0, "branches": sum(len(rows) for rows, _ in outputs)}
    whole = Combiner(gen, nets, subsets, top_n=2, method="fixed_point", input_shape=(1, 4, 4))
    torch.testing.assert_close(shared.predict_proba(x), whole.predict_proba(x), rtol=0, atol=1e-6)

    share = [0.5, 0.25, 0.0]
    first, branch = 16 * width, width * width  # the multiply-adds of the first hidden layer and of the second
    assert shared.multiply_adds(share) == first + branch + width * classes + sum(
        w * (branch + width * (len(s) + 1)) for w, s in zip(share, subsets))
    assert whole.multiply_adds(share) == multiply_adds(gen, (1, 4, 4)) + sum(
        w * multiply_adds(n, (1, 4, 4)) for w, n in zip(share, nets))
    own = sum(p.numel() for p in gen.trunk[1].parameters())
    assert shared.parameter_count() == sum(p.numel() for n in [gen, *nets] for p in n.parameters()) - 3 * own


def test_the_combiner_refuses_specialists_that_do_not_share_the_blocks_it_is_told_they_share():
    gen, nets, subsets = _mlp_ensemble()
    with torch.no_grad():
        nets[1].trunk[1].bias[0] += 1
    with pytest.raises(ValueError, match=r"specialist 1 does not share the generalist's first 1 blocks: its trunk.1.bias"):
        Combiner(gen, nets, subsets, shared_blocks=1)
    with pytest.raises(ValueError, match="shared_blocks=3: the generalist has no such blocks"):
        Combiner(gen, nets, subsets, shared_blocks=3)


@pytest.mark.parametrize("overrides, message", [
    (["specialists.branch_at=2"], "specialists.branch_at must be at most 1, the blocks of generalist.net mlp (depth 1), got 2"),
    (["specialists.branch_at=1", "specialists.freeze_trunk=true"], "specialists.freeze_trunk shares all 1 blocks"),
    (["specialists.branch_at=1", "specialists.width=16"], "specialists.branch_at shares the generalist's blocks"),
    (["generalist.net.name=cnn", "specialists.branch_at=5"], "at most 4, the blocks of generalist.net cnn, got 5"),
    (["generalist.net.name=cnn", "specialists.branch_at=trunk.3"], "specialists.branch_at: the built-in net cnn is "
                                                                   "cut after a number of blocks (0 to 4), not after "
                                                                   "a module name ('trunk.3')"),
])
def test_branch_settings_that_cannot_hold_together_are_an_error_naming_the_key(overrides, message):
    cfg = load_config(None, ["generalist.net.width=8", *overrides])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        shared_blocks(cfg.specialists, cfg.generalist.net)


def test_branch_specialists_through_the_pipeline(upstream, tmp_path):
    """The tiny run's MLP has one block: `branch_at: 1` shares its hidden layer; the specialists keep the
    generalist's tensors there, the combiner stage runs it once, and the reports count the branches."""
    cfg = specialists_run(upstream, tmp_path, "specialists.branch_at=1", "specialists.select_on_validation=false",
                          "baselines.budgets=[]")
    for stage in ("specialists", "baselines", "combiner"):
        run_pipeline(cfg, only=stage)
    ensemble = load_ensemble(cfg.run_dir, cfg)
    assert ensemble.shared_blocks == 1
    for net in ensemble.specialists:
        assert torch.equal(net.trunk[1].weight, ensemble.generalist.trunk[1].weight)
        assert not torch.equal(net.head.weight[:-1], ensemble.generalist.head.weight[:len(net.head.weight) - 1])
    evaluation = json.loads((cfg.run_dir / "combiner" / "eval.json").read_text())
    combiner = Combiner.from_run(cfg.run_dir)
    active = evaluation["table3"][1]["active_specialists"]
    head = 64 * (len(ensemble.subsets[0]) + 1)  # the subsets are all of one size here
    assert {len(s) for s in ensemble.subsets} == {len(ensemble.subsets[0])}
    assert evaluation["ensemble_multiply_adds"] == pytest.approx(evaluation["generalist_multiply_adds"] + active * head)
    assert combiner.shared_blocks == 1
