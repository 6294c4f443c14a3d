"""One probe set for every layer: unbiased per layer, against the exact kappa and the per-layer
estimator."""
import pytest
import torch
from torch import nn

import relflat_ext as rf
from models import data, mlp


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
