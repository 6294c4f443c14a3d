"""The comparison measures: Hessian trace, Fisher-Rao norm, PAC-Bayes flatness, weight norm."""
import math

import pytest
import torch
from torch import nn

import relflat_ext as rf
from relflat_ext import measures
from models import assert_unchanged, data, mlp, snapshot


@pytest.mark.parametrize("layer, loss", [("0", "cross_entropy"), ("2", "mse"), ("4", "cross_entropy")])
def test_hessian_trace_is_exact_for_linear_layers(layer, loss):
    model = mlp([5, 7, 6, 3], "tanh", seed=1)
    x, y = data(60, 5, 3, loss, seed=1)
    dense, _ = rf.layer_hessian(model, layer, x, y, loss=loss)
    assert measures.hessian_trace(model, layer, x, y, loss=loss) == pytest.approx(torch.trace(dense).item(), rel=1e-10)


def test_hessian_trace_of_a_conv_layer_is_estimated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    w0 = model[0].weight.detach().clone()
    hess = torch.autograd.functional.hessian(
        lambda w: nn.functional.cross_entropy(torch.func.functional_call(model, {"0.weight": w}, (x,)), y), w0)
    exact = torch.trace(hess.reshape(w0.numel(), w0.numel())).item()
    est = rf.stochastic_estimate(model, "0", x, y, quantity="hessian_trace", rel_tol=0.02, seed=0)
    assert abs(est.value - exact) <= 3 * est.stderr
    assert measures.hessian_trace(model, "0", x, y, rel_tol=0.02, seed=0) == pytest.approx(est.value)


def test_fisher_rao_equals_the_parameter_identity_for_bias_free_relu_networks():
    """<theta, grad_theta l_i> = (L+1) <dl/df, f> by positive homogeneity, so both forms agree."""
    model = mlp([5, 8, 6, 3], "relu", seed=2, bias=False)
    x, y = data(40, 5, 3, "cross_entropy", seed=2)
    fr = measures.fisher_rao_norm(model, x, y)
    assert fr.depth == 3
    params = list(model.parameters())
    inner = []
    for i in range(40):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        inner.append(sum((p * g).sum() for p, g in zip(params, grads)).item())
    assert fr.norm_sq == pytest.approx(sum(v * v for v in inner) / 40, rel=1e-9)
    assert fr.norm == pytest.approx(math.sqrt(fr.norm_sq))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    assert measures.fisher_rao_norm(model, loader).norm_sq == pytest.approx(fr.norm_sq, rel=1e-12)


def test_fisher_rao_differs_from_the_identity_with_biases():
    model = mlp([5, 8, 6, 3], "relu", seed=2, bias=True)
    x, y = data(40, 5, 3, "cross_entropy", seed=2)
    params = list(model.parameters())
    grads = [torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params) for i in range(40)]
    ident = sum(sum((p * g).sum() for p, g in zip(params, gs)).item() ** 2 for gs in grads) / 40
    assert measures.fisher_rao_norm(model, x, y).norm_sq != pytest.approx(ident, rel=1e-3)


def test_pacbayes_finds_the_largest_sigma_within_the_accuracy_drop():
    torch.manual_seed(0)
    model = mlp([5, 16, 3], "tanh", seed=3)
    x, _ = data(200, 5, 3, "cross_entropy", seed=3)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the model gets right: training accuracy 1
    before = snapshot(model)
    res = measures.pacbayes_flatness(model, x, y, target_drop=0.1, draws=5, seed=0)
    assert_unchanged(model, before)
    assert res.accuracy == 1.0 and 0 < res.sigma < 2.0
    assert res.accuracy - res.noisy_accuracy <= 0.1
    bigger = measures.pacbayes_flatness(model, x, y, target_drop=0.3, draws=5, seed=0)
    assert bigger.sigma >= res.sigma  # a looser drop allows more noise
    assert res.flatness == pytest.approx(1 / res.sigma ** 2)
    assert res.bound == pytest.approx(res.weight_norm_sq / (4 * res.sigma ** 2) + math.log(200 / res.sigma) + 10)
    again = measures.pacbayes_flatness(model, x, y, target_drop=0.1, draws=5, seed=0)
    assert again.sigma == res.sigma


def test_weight_norm_and_errors():
    model = mlp([5, 7, 3], "tanh", seed=0)
    assert measures.weight_norm(model[0]) == pytest.approx(float(model[0].weight.detach().pow(2).sum()))
    with pytest.raises(TypeError, match="weight"):
        measures.weight_norm(nn.Tanh())
    x, y = data(10, 5, 3, "cross_entropy")
    with pytest.raises(ValueError, match="target_drop"):
        measures.pacbayes_flatness(model, x, y, target_drop=1.5)
    with pytest.raises(ValueError, match="depth"):
        measures.fisher_rao_norm(model, x, y, depth=0)
