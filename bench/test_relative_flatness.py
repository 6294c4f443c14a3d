"""Relative flatness: the package vs the eager closed form vs the authors' autograd baseline.
Every case checks its result against the reference before it is timed (CPU here; the device is
recorded in the benchmark's extra_info)."""

import pytest
import torch
from torch import nn

import relflat_ext as rf


def _device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"


def _head(n, m=84, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, m, generator=g), torch.randn(d, m, generator=g) / m ** 0.5,
            torch.randn(d, generator=g) * 0.1, torch.randint(0, d, (n,), generator=g))


def eager_closed_form(phi, w, b):
    """What one writes in plain PyTorch: logits, softmax, and the closed form through W^T p."""
    p = torch.softmax(phi @ w.T + b, 1)
    return (phi.pow(2).sum(1) * ((p * w.pow(2).sum(1)).sum(1) - (p @ w).pow(2).sum(1))).mean()


@pytest.mark.benchmark(group="lenet-head")
@pytest.mark.parametrize("contender", ["relflat", "eager", "autograd"])
def test_lenet_head(benchmark, contender, full):
    n = 50000 if full else 5000
    phi, w, b, y = _head(n)
    head = nn.Linear(84, 10)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    expected = eager_closed_form(phi.double(), w.double(), b.double()).item()
    fns = {"relflat": lambda: rf.relative_flatness_from_features(phi, w, y, bias=b, block_trace=False).kappa,
           "eager": lambda: eager_closed_form(phi, w, b).item(),
           "autograd": lambda: rf.relative_flatness_autograd(head, head, phi, y).kappa}
    got = fns[contender]()
    assert abs(got - expected) <= 1e-4 * abs(expected)
    benchmark.extra_info["device"] = _device_name()
    rounds = 1 if contender == "autograd" else 10
    benchmark.pedantic(fns[contender], rounds=rounds, iterations=1, warmup_rounds=0 if rounds == 1 else 1)


def _tanh_mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if k < len(widths) - 2 else [])
    return nn.Sequential(*layers)


@pytest.mark.benchmark(group="mlp-100-64-32-10-layer2")
@pytest.mark.parametrize("contender", ["relflat", "autograd-vectorized"])
def test_small_mlp_layer(benchmark, contender, full):
    n = 10000 if full else 2000
    model = _tanh_mlp([100, 64, 32, 10])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 100, generator=g), torch.randint(0, 10, (n,), generator=g)
    fns = {"relflat": lambda: rf.relative_flatness(model, "2", x, y, block_trace=False).kappa,
           "autograd-vectorized": lambda: rf.relative_flatness_autograd(model, "2", x, y, vectorize=True).kappa}
    got = fns[contender]()
    ref = rf.relative_flatness(model.double(), "2", x.double(), y).kappa
    model.float()
    assert abs(got - ref) <= 1e-4 * abs(ref)
    benchmark.extra_info["device"] = _device_name()
    benchmark.pedantic(fns[contender], rounds=1 if "autograd" in contender else 3, iterations=1)


@pytest.mark.benchmark(group="mlp-784-512-256-10-layer2")
def test_large_mlp_layer(benchmark, full):
    """256x512 layer: its full Hessian has 131072^2 entries; only the exact path runs."""
    n = 10000 if full else 1000
    model = _tanh_mlp([784, 512, 256, 10])
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    sub = slice(0, 64)  # correctness on a subset in float64 against the same path in float64
    ref = rf.relative_flatness(model.double(), "2", x[sub].double(), y[sub]).kappa
    model.float()
    assert abs(rf.relative_flatness(model, "2", x[sub], y[sub]).kappa - ref) <= 1e-4 * abs(ref)
    benchmark.extra_info["device"] = _device_name()
    benchmark.pedantic(lambda: rf.relative_flatness(model, "2", x, y, block_trace=False), rounds=1, iterations=1)
