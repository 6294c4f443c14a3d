"""The loss table: every record's pieces agree with autograd on the function it names."""
import pytest
import torch

from relflat_ext.core.losses import LOSSES, CallableLoss, DiagonalHessian, SoftmaxHessian, get_loss

N, D = 6, 4
# torch.func.hessian goes through torch.jit internally, which warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _data(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    if name == "cross_entropy":
        y = torch.randint(0, D, (N,), generator=g)
    elif name == "mse":
        y = torch.randn(N, D, generator=g, dtype=torch.float64)
    else:
        y = torch.rand(N, D, generator=g, dtype=torch.float64).round()
    return z, y


def _dense(hessian):
    if isinstance(hessian, SoftmaxHessian):
        return torch.diag_embed(hessian.p) - hessian.p[:, :, None] * hessian.p[:, None, :]
    assert isinstance(hessian, DiagonalHessian)
    return torch.diag_embed(hessian.values)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_output_hessian_is_the_per_sample_hessian(name):
    loss = LOSSES[name]
    z, y = _data(name)
    # E = mean_i l_i, so l_i = N * E restricted to sample i: the Hessian of N * loss in z_i
    want = torch.stack([torch.func.hessian(lambda zi: N * loss(torch.cat([z[:i], zi[None], z[i + 1:]]), y))(z[i])
                        for i in range(N)])
    torch.testing.assert_close(_dense(loss.output_hessian(z)), want)
    torch.testing.assert_close(loss.output_hessian_diagonal(z), want.diagonal(dim1=1, dim2=2))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_per_sample_losses_statistics_and_derivatives(name):
    loss = LOSSES[name]
    z, y = _data(name, seed=1)
    per = loss.per_sample(z, y)
    torch.testing.assert_close(per.mean(), loss(z, y))
    # The statistics of one prediction, weighted by 1, give its loss at any label.
    torch.testing.assert_close(loss.loss_from_statistics(loss.statistics(z), y), per)
    leaf = z.clone().requires_grad_(True)
    grad = torch.autograd.grad(loss.for_derivatives(leaf, y), leaf, create_graph=True)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(loss(leaf, y), leaf)[0])
    v = torch.randn_like(z)
    hvp = torch.autograd.grad(grad, leaf, v)[0]
    torch.testing.assert_close(hvp * N, (_dense(loss.output_hessian(z)) @ v[:, :, None])[..., 0])


def test_get_loss():
    assert get_loss("mse") is LOSSES["mse"]
    custom = get_loss(lambda out, y: (out - y).abs().mean())
    assert isinstance(custom, CallableLoss) and not custom.builtin and custom.output_hessian(torch.zeros(2, 2)) is None
    with pytest.raises(ValueError, match="loss must be one of"):
        get_loss("hinge")
