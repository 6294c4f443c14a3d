"""One probe set for every layer: unbiased per layer, against the exact kappa and the per-layer
estimator."""
import warnings

import pytest
import torch
from torch import nn

import relflat_ext as rf
from models import data, mlp, train_to_minimum


@pytest.mark.parametrize("sketch", [0, 8])
def test_shared_probes_estimate_every_layer(sketch):
    model = mlp([5, 7, 6, 3], "tanh", seed=2)
    x, y = data(40, 5, 3, "cross_entropy", seed=2)
    names = ["0", "2", "4"]
    joint = rf.stochastic_estimate_layers(model, names, x, y, rel_tol=0.03, max_probes=2000, seed=0, sketch=sketch)
    for name in names:
        exact = rf.relative_flatness(model, name, x, y, method="exact").kappa
        est = joint[name]
        assert abs(est.value - exact) <= 4 * est.stderr, (name, est.value, exact, est.stderr)
        single = rf.stochastic_estimate(model, name, x, y, rel_tol=0.03, max_probes=2000, seed=1)
        assert abs(est.value - single.value) <= 4 * (est.stderr ** 2 + single.stderr ** 2) ** 0.5


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_a_full_sketch_is_exact(loss):
    """With as many sketch columns as probe coordinates, Q spans everything: every layer's kappa
    is the exact part alone (the residual probes are zero), whatever the layer shapes (m <= d
    uses W as the factor, m > d the square root of W W^T)."""
    model = mlp([4, 3, 5, 2], "tanh", seed=4)
    x, y = data(30, 4, 2, loss, seed=4)
    names = ["0", "2", "4"]  # W (3, 4): m > d; (5, 3): m < d; (2, 5): m > d
    dim = 3 * 4 + 3 * 3 + 2 * 5
    joint = rf.stochastic_estimate_layers(model, names, x, y, loss=loss, sketch=dim, max_probes=2 * dim + 4, seed=0)
    for name in names:
        exact = rf.relative_flatness(model, name, x, y, loss=loss, method="autograd").kappa
        assert joint[name].value == pytest.approx(exact, rel=1e-9, abs=1e-12)
        assert joint[name].stderr <= 1e-9 * max(abs(exact), 1e-3)


def test_the_sketch_taken_in_blocks_gives_the_same_estimates(monkeypatch):
    """The sketch's products M S, a few columns per forward pass (to bound their memory), are the
    ones all columns at once give: the same samples to the last bit."""
    from relflat_ext.flatness import joint
    model = mlp([5, 7, 6, 3], "tanh", seed=4)
    x, y = data(30, 5, 3, "cross_entropy", seed=4)
    kwargs = dict(sketch=6, rel_tol=1e-12, max_probes=18, seed=0)
    whole = rf.stochastic_estimate_layers(model, ["0", "2", "4"], x, y, **kwargs)
    calls = []
    operator = joint._Operator.__call__
    monkeypatch.setattr(joint._Operator, "__call__", lambda self, p: calls.append(p.shape[0]) or operator(self, p))
    monkeypatch.setattr(joint, "SKETCH_BLOCK_BYTES", 1)  # one column a block
    blocks = rf.stochastic_estimate_layers(model, ["0", "2", "4"], x, y, **kwargs)
    assert calls == [1] * 6
    for name in whole:
        assert torch.equal(whole[name].samples, blocks[name].samples)


def test_sketch_option_errors():
    model = mlp([4, 3, 2], "tanh", seed=1)
    x, y = data(10, 4, 2, "cross_entropy", seed=1)
    with pytest.raises(ValueError, match="sketch must be"):
        rf.stochastic_estimate_layers(model, ["0"], x, y, sketch=-1)
    with pytest.raises(ValueError, match="raise max_probes"):
        rf.stochastic_estimate_layers(model, ["0"], x, y, sketch=10, max_probes=20)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func's internal jit
def test_shared_probes_on_a_convolution_and_the_hessian_trace():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    joint = rf.stochastic_estimate_layers(cnn, ["0", "3"], x, y, quantity="hessian_trace", rel_tol=0.03,
                                          max_probes=3000, seed=0, sketch=16)
    for name in ("0", "3"):
        w = dict(cnn.named_modules())[name].weight
        hess = torch.func.hessian(lambda ww: nn.functional.cross_entropy(
            torch.func.functional_call(cnn, {f"{name}.weight": ww}, (x,)), y))(w.detach())
        exact = float(hess.detach().reshape(w.numel(), w.numel()).trace())
        assert abs(joint[name].value - exact) <= 4 * joint[name].stderr


def test_batched_products_equal_one_pass_per_direction():
    """The vmap'd backward (is_grads_batched, the GPU default) gives the loop's products."""
    from relflat_ext.flatness.joint import _batch_hvps
    from relflat_ext.flatness.problem import Problem
    model = mlp([5, 7, 6, 3], "tanh", seed=3)
    x, y = data(20, 5, 3, "cross_entropy", seed=3)
    problem = Problem.build(model, "0", x, y)
    weights = [model[0].weight, model[2].weight, model[4].weight]
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn((11, *w.shape), generator=g, dtype=w.dtype) for w in weights]  # 11: a partial block
    for w in weights:
        w.requires_grad_(True)
    loop = _batch_hvps(problem, weights, x, y, dirs, batched=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the loop would warn
        vmapped = _batch_hvps(problem, weights, x, y, dirs, batched=True)
    for a, b in zip(loop, vmapped):
        torch.testing.assert_close(torch.stack(a), torch.stack(b), rtol=1e-12, atol=1e-14)


def test_deflated_shared_probes_at_a_confident_float32_minimum():
    """Where users measure: a network trained to a confident minimum, in float32. The deflated
    estimates agree with the exact float64 kappa within their error bars, and the sketch takes away
    most of the variance per probe of plain joint probes (the Hessian there is near low rank)."""
    torch.manual_seed(0)
    x, y = data(120, 6, 3, "cross_entropy", seed=5)
    model = mlp([6, 16, 12, 3], "tanh", seed=5).float()
    train_to_minimum(model, x.float(), y, steps=400, lr=3e-2)
    names = ["0", "2", "4"]
    kw = dict(rel_tol=1e-9, max_probes=160, seed=0)
    joint = rf.stochastic_estimate_layers(model, names, x.float(), y, sketch=32, **kw)
    plain = rf.stochastic_estimate_layers(model, names, x.float(), y, sketch=0, **kw)
    for name in names:
        exact = rf.relative_flatness(model.double(), name, x, y, method="exact").kappa
        model.float()
        est = joint[name]
        assert abs(est.value - exact) <= 4 * est.stderr + 1e-5 * abs(exact), (name, est.value, est.stderr, exact)
        # the sketch removes most of the variance per probe that plain joint probes carry
        assert est.samples.double().var() < 0.1 * plain[name].samples.double().var(), name  # 40-500x measured
