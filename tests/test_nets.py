import pytest
import torch
from torch import nn

from ensemble.config import NetConfig, load_config
from ensemble.nets import build_net, is_conv


@pytest.mark.parametrize("cfg, shape", [
    (NetConfig("mlp", width=32, depth=2, dropout=0.5), (1, 28, 28)),
    (NetConfig("cnn", width=8, depth=2), (1, 28, 28)),
    (NetConfig("resnet", width=8, depth=1), (3, 32, 32)),
])
def test_nets_expose_their_head(cfg, shape):
    net = build_net(cfg, shape, num_classes=17).eval()
    x = torch.rand(5, *shape)
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 17
    assert net(x).shape == (5, 17)
    assert torch.allclose(net(x), net.head(net.features(x)))
    assert is_conv(net) == (cfg.name != "mlp")


def test_paper_mlp_sizes():
    net = build_net(NetConfig("mlp", width=1200, depth=2, dropout=0.5), (1, 28, 28), 10)
    assert sum(p.numel() for p in net.parameters()) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10


def test_input_stats_normalise_and_are_saved():
    net = build_net(NetConfig("mlp", width=4, depth=1), (2, 4, 4), 3)
    images = torch.randint(0, 256, (50, 2, 4, 4), dtype=torch.uint8)
    net.set_input_stats(images)
    x = images.float() / 255
    assert torch.allclose(net.input_mean.flatten(), x.mean(dim=(0, 2, 3)))
    assert "input_mean" in net.state_dict() and "input_std" in net.state_dict()


def test_bad_net_config():
    with pytest.raises(ValueError, match="'generalist.net.width' must be >= 1, got 0"):
        load_config(None, ["generalist.net.width=0"])
