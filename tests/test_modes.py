"""Measurements called where users call them: inside a ``torch.no_grad()`` evaluation block,
``torch.inference_mode()``, or a ``torch.autocast`` region, and on inputs that carry a graph. Each
returns what it returns outside (the measurement runs with gradients on, inference mode and
autocast off), leaves the caller's modes as they were, and never attaches its result to the
inputs' graph."""

import pytest
import torch
from torch import nn

import relflat_ext as rf


class Residual(nn.Module):
    """Not a Sequential and not a tail the chain rule takes: the exact path by HVPs."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(x + torch.tanh(self.inner(x)))


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    residual = Residual()
    return net, residual, x, y


MEASUREMENTS = {
    "closed_form": lambda net, res, x, y: rf.relative_flatness(net, "2", x, y).kappa,
    "chain_rule": lambda net, res, x, y: rf.relative_flatness(net, "0", x, y, lmax=True).kappa_lmax,
    "hvp": lambda net, res, x, y: rf.relative_flatness(res, "inner", x.repeat(1, 2)[:, :8], y).kappa,
    "stochastic": lambda net, res, x, y: rf.relative_flatness(net, "0", x, y, method="stochastic", seed=1).kappa,
    "autograd": lambda net, res, x, y: rf.relative_flatness_autograd(net, "0", x, y).kappa,
    "layer_hessian": lambda net, res, x, y: float(rf.layer_hessian(net, "0", x, y)[0].abs().sum()),
    "profile": lambda net, res, x, y: float(rf.profile(net, x, y, seed=1).rows[0]["kappa"]),
    "feature_robustness": lambda net, res, x, y: rf.feature_robustness(net, "0", x, y, delta=0.05, seed=1).value,
    "representativeness": lambda net, res, x, y: rf.representativeness(net, "2", x, y, seed=1).value,
    "bound": lambda net, res, x, y: rf.generalization_bound(net, "2", x, y, seed=1).bound,
    "hessian_trace": lambda net, res, x, y: rf.measures.hessian_trace(net, "0", x, y),
    "fisher_rao": lambda net, res, x, y: rf.measures.fisher_rao_norm(net, x, y).norm,
    "feature_scale": lambda net, res, x, y: float(rf.feature_scale(net, "2", x, y).sum()),
}
CALLERS = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "autocast_bfloat16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
}


def _modes():
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("what", MEASUREMENTS)
def test_a_measurement_returns_inside_a_callers_mode_what_it_returns_outside(what, caller):
    net, residual, x, y = _setup()
    expected = MEASUREMENTS[what](net, residual, x, y)
    with CALLERS[caller]():
        inside = _modes()
        got = MEASUREMENTS[what](net, residual, x, y)
        assert _modes() == inside, "the caller's modes must be restored"
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_inputs_made_under_inference_mode_and_inputs_with_a_graph_are_measured_as_data():
    net, _, x, y = _setup()
    expected = rf.relative_flatness(net, "0", x, y).kappa
    with torch.inference_mode():
        frozen = x.clone()
    assert rf.relative_flatness(net, "0", frozen, y).kappa == pytest.approx(expected, rel=1e-6)
    leaf = x.clone().requires_grad_()
    result = rf.relative_flatness(net, "0", leaf * 1.0, y)
    assert result.kappa == pytest.approx(expected, rel=1e-6)
    assert leaf.grad is None
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for v in vars(result).values())


def test_a_model_built_under_inference_mode_gets_an_error_naming_it():
    with torch.inference_mode():
        net = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="inference_mode"):
        rf.relative_flatness(net, "0", torch.randn(5, 4), torch.randint(0, 3, (5,)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_batches_go_to_the_device_of_a_model_on_a_gpu():
    """A DataLoader yields CPU tensors; a model on one GPU gets each batch moved there (tensors given
    whole stay on the CPU and move one batch at a time)."""
    net, _, x, y = _setup()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    deterministic = ("closed_form", "chain_rule", "autograd", "fisher_rao")  # no random draws, which differ on a GPU
    expected = {what: MEASUREMENTS[what](net, None, x, y) for what in deterministic}
    gpu = net.cuda()
    assert rf.relative_flatness(gpu, "2", loader).kappa == pytest.approx(expected["closed_form"], rel=1e-4)
    for what, value in expected.items():
        assert MEASUREMENTS[what](gpu, None, x, y) == pytest.approx(value, rel=1e-4, abs=1e-9)
