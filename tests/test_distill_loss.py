"""The distillation loss against its analytic gradient, the T² scaling, and its input checks."""
import pytest
import torch
import torch.nn.functional as F

from distill_back import distillation_loss
from distill_back.loss import UNLABELLED


def _case(b=6, c=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (b,), generator=g)
    return z, t, y


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (4.0, 0.9), (0.5, 0.0), (20.0, 1.0)])
def test_gradient_is_the_analytic_one(temperature, alpha):
    """d/dz [α T² KL(softmax(t/T) ‖ softmax(z/T)) + (1-α) CE(y, z)] / B
    = [α T (softmax(z/T) - softmax(t/T)) + (1-α)(softmax(z) - onehot(y))] / B."""
    z, t, y = _case()
    z.requires_grad_()
    distillation_loss(z, t, y, temperature=temperature, alpha=alpha).backward()
    T = temperature
    expected = (alpha * T * (torch.softmax(z / T, 1) - torch.softmax(t / T, 1))
                + (1 - alpha) * (torch.softmax(z, 1) - F.one_hot(y, z.shape[1]))) / len(z)
    torch.testing.assert_close(z.grad, expected.detach(), rtol=1e-10, atol=1e-12)


def test_t_squared_keeps_the_soft_gradient_on_one_scale():
    """As T grows the soft gradient tends to (z - t)/(C B) for zero-mean logits (the paper's §2.1):
    with T² its size settles; without it, it would shrink as 1/T²."""
    z, t, _ = _case()
    z, t = z - z.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    limit = (z - t) / (z.shape[1] * len(z))
    norms = []
    for T in (10.0, 100.0, 10_000.0):
        zz = z.clone().requires_grad_()
        distillation_loss(zz, t, temperature=T).backward()
        norms.append(zz.grad.norm().item())
    assert (zz.grad - limit).norm() < 1e-3 * limit.norm()  # the error shrinks as 1/T
    assert norms[1] / norms[2] == pytest.approx(1, abs=0.05) and norms[0] / norms[2] == pytest.approx(1, abs=0.3)


def test_unlabelled_rows_get_the_soft_term_only():
    z, t, y = _case()
    soft_only = distillation_loss(z, t, temperature=2.0)
    assert distillation_loss(z, t, torch.full_like(y, UNLABELLED), temperature=2.0, alpha=0.3) == soft_only
    mixed = y.clone()
    mixed[:3] = UNLABELLED
    per_row = [distillation_loss(z[i:i + 1], t[i:i + 1], mixed[i:i + 1] if i >= 3 else None, temperature=2.0,
                                 alpha=0.3) for i in range(len(z))]
    torch.testing.assert_close(distillation_loss(z, t, mixed, temperature=2.0, alpha=0.3), torch.stack(per_row).mean())


def test_bad_inputs_raise_clear_errors():
    z, t, y = _case()
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        distillation_loss(z, t, y, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0, got -1"):
        distillation_loss(z, t, y, temperature=-1.0)
    with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\], got 1.5"):
        distillation_loss(z, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="one output per class"):
        distillation_loss(z[:, :-1], t, y)
