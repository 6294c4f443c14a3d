"""One probe set for every layer: unbiased per layer, against the exact kappa and the per-layer
estimator."""
import pytest
import torch
from torch import nn

import relflat_ext as rf
from models import data, mlp


def test_shared_probes_estimate_every_layer():
    model = mlp([5, 7, 6, 3], "tanh", seed=2)
    x, y = data(40, 5, 3, "cross_entropy", seed=2)
    names = ["0", "2", "4"]
    joint = rf.stochastic_estimate_layers(model, names, x, y, rel_tol=0.03, max_probes=2000, seed=0)
    for name in names:
        exact = rf.relative_flatness(model, name, x, y, method="exact").kappa
        est = joint[name]
        assert abs(est.value - exact) <= 4 * est.stderr, (name, est.value, exact, est.stderr)
        single = rf.stochastic_estimate(model, name, x, y, rel_tol=0.03, max_probes=2000, seed=1)
        assert abs(est.value - single.value) <= 4 * (est.stderr ** 2 + single.stderr ** 2) ** 0.5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func's internal jit
def test_shared_probes_on_a_convolution_and_the_hessian_trace():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    joint = rf.stochastic_estimate_layers(cnn, ["0", "3"], x, y, quantity="hessian_trace", rel_tol=0.03,
                                          max_probes=3000, seed=0)
    for name in ("0", "3"):
        w = dict(cnn.named_modules())[name].weight
        hess = torch.func.hessian(lambda ww: nn.functional.cross_entropy(
            torch.func.functional_call(cnn, {f"{name}.weight": ww}, (x,)), y))(w.detach())
        exact = float(hess.detach().reshape(w.numel(), w.numel()).trace())
        assert abs(joint[name].value - exact) <= 4 * joint[name].stderr
