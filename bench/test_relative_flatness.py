"""Relative flatness, head and intermediate layers: the package (and, for intermediate layers, its
general Hessian-vector-product path) against the pure-PyTorch fallback, the eager closed form, the
authors' autograd method (per-entry double backward), torch.func.hessian, a Hutchinson-style
estimate with curvlinops, and the logits GEMM alone as the floor. Every case checks its result
against a float64 reference before it is timed."""
import pytest
import torch
from torch import nn

import relflat_ext as rf
from relflat_ext.apps.zoo import mlp
from relflat_ext import fallback_only, hvp_only

from bench.common import record, run

HEAD_CONTENDERS = ["relflat", "fallback", "eager", "autograd-loop", "torch-func-hessian", "gemm-floor"]


def _head(n, m, d, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(n, m, generator=g), torch.randn(d, m, generator=g) / m ** 0.5,
               torch.randn(d, generator=g) * 0.1, torch.randint(0, d, (n,), generator=g))
    return [t.to(device) for t in tensors]


def eager_closed_form(phi, w, b):
    """What one writes in plain PyTorch: logits, softmax, and the closed form through W^T p."""
    p = torch.softmax(phi @ w.T + b, 1)
    return (phi.pow(2).sum(1) * ((p * w.pow(2).sum(1)).sum(1) - (p @ w).pow(2).sum(1))).mean()


def func_hessian_kappa(phi, w, b, y):
    """torch.func.hessian of the mean loss in W, then the block traces: the (dm)^2 Hessian in memory."""
    d, m = w.shape
    hess = torch.func.hessian(lambda ww: torch.nn.functional.cross_entropy(phi @ ww.T + b, y))(w)
    return rf.ops.dense_block_trace(hess.reshape(d * m, d * m), w)[0]


def _head_case(benchmark, contender, n, m, d, device):
    phi, w, b, y = _head(n, m, d, device)
    expected = eager_closed_form(phi.double(), w.double(), b.double()).item()
    head = nn.Linear(m, d).to(device)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    hessian_bytes = (d * m) ** 2 * 4
    if contender in ("autograd-loop", "torch-func-hessian") and hessian_bytes > 2 << 30:
        pytest.skip(f"the full Hessian needs {hessian_bytes / 2**30:.0f} GiB")
    if contender == "autograd-loop" and d * m > 1000:
        pytest.skip(f"{d * m} double backwards: hours")

    def via_api():
        return rf.relative_flatness_from_features(phi, w, y, bias=b, block_trace=False).kappa

    def via_fallback():
        with fallback_only():
            return via_api()

    fns = {"relflat": via_api, "fallback": via_fallback, "eager": lambda: eager_closed_form(phi, w, b).item(),
           "autograd-loop": lambda: rf.relative_flatness_autograd(head, head, phi, y).kappa,
           "torch-func-hessian": lambda: float(func_hessian_kappa(phi, w, b, y)),
           "gemm-floor": lambda: phi @ w.T + b}
    if contender != "gemm-floor":
        got = fns[contender]()
        assert abs(got - expected) <= 1e-4 * abs(expected), (got, expected)
    # Work model: the logits GEMM and one read of the features.
    record(benchmark, device, flops=2.0 * n * m * d, bytes_moved=4.0 * n * m, n=n, m=m, d=d)
    run(benchmark, fns[contender], device, rounds=1 if contender.startswith(("autograd", "torch-func")) else 10)


@pytest.mark.benchmark(group="head-lenet (n=50000, m=84, d=10)")
@pytest.mark.parametrize("contender", HEAD_CONTENDERS)
def test_lenet_head(benchmark, contender, full, device):
    _head_case(benchmark, contender, 50000 if full else 5000, 84, 10, device)


@pytest.mark.benchmark(group="head-imagenet (n=50000, m=2048, d=1000)")
@pytest.mark.parametrize("contender", HEAD_CONTENDERS)
def test_imagenet_head(benchmark, contender, full, device):
    _head_case(benchmark, contender, 50000 if full else 2000, 2048, 1000, device)


def _tanh_mlp(widths, seed=0):
    torch.manual_seed(seed)
    return mlp(widths)


def hutchinson_curvlinops(model, layer, x, y, probes=64, seed=0):
    """kappa = E_A[vec(W A)^T H vec(W A)], A with i.i.d. N(0, 1) entries (DESIGN.md), with the
    Hessian-vector products of curvlinops' HessianLinearOperator; returns (mean, standard error)."""
    from curvlinops import HessianLinearOperator
    weight = dict(model.named_modules())[layer].weight
    hessian = HessianLinearOperator(model, nn.CrossEntropyLoss(), [weight], [(x, y)], check_deterministic=False)
    g = torch.Generator(device=x.device).manual_seed(seed)
    a = torch.randn(probes, weight.shape[1], weight.shape[1], generator=g, device=x.device)
    v = (weight.detach() @ a).reshape(probes, -1).T  # (d*m, probes)
    quad = (v * (hessian @ v)).sum(0)
    return quad.mean().item(), (quad.std() / probes ** 0.5).item()


def _layer_case(benchmark, contender, widths, n, device):
    model = _tanh_mlp(widths).to(device)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, widths[0], generator=g).to(device), torch.randint(0, widths[-1], (n,), generator=g).to(device)
    d, m = widths[2], widths[1]
    sub = slice(0, min(n, 2000))  # float64 reference of the exact path on a subset
    expected = rf.relative_flatness(model.double(), "2", x[sub].double(), y[sub], block_trace=False).kappa
    model.float()
    hessian_bytes = (d * m) ** 2 * 4
    if contender.startswith("autograd") and hessian_bytes > 2 << 30:
        pytest.skip(f"the full Hessian needs {hessian_bytes / 2**30:.0f} GiB")
    if contender == "autograd-loop" and d * m > 4096:
        pytest.skip(f"{d * m} double backwards: hours")
    if contender == "curvlinops-hutchinson":
        pytest.importorskip("curvlinops")

    def via_api(xs, ys):
        return rf.relative_flatness(model, "2", xs, ys, block_trace=False).kappa

    def via_hvp(xs, ys):  # the general exact path (any model), here with the compiled contraction
        with hvp_only():
            return via_api(xs, ys)

    def via_fallback_hvp(xs, ys):
        with fallback_only(), hvp_only():
            return via_api(xs, ys)

    fns = {"relflat": via_api, "relflat-hvp": via_hvp, "fallback-hvp": via_fallback_hvp,
           "autograd-loop": lambda xs, ys: rf.relative_flatness_autograd(model, "2", xs, ys).kappa,
           "autograd-vectorized": lambda xs, ys: rf.relative_flatness_autograd(model, "2", xs, ys,
                                                                              vectorize=True).kappa,
           "curvlinops-hutchinson": lambda xs, ys: hutchinson_curvlinops(model, "2", xs, ys)}
    if contender == "curvlinops-hutchinson":
        mean, se = hutchinson_curvlinops(model, "2", x[sub], y[sub])
        assert abs(mean - expected) <= 5 * se, (mean, se, expected)
        benchmark.extra_info["note"] = "64 probes: a stochastic estimate, not the exact value"
    else:
        got = fns[contender](x[sub][:500], y[sub][:500]) if contender.startswith("autograd") else \
            fns[contender](x[sub], y[sub])
        want = expected if not contender.startswith("autograd") else \
            rf.relative_flatness(model.double(), "2", x[:500].double(), y[:500], block_trace=False).kappa
        model.float()
        assert abs(got - want) <= 1e-4 * abs(want), (got, want)
    # No FLOP or byte model: the cost is d Hessian-vector products through the model's tail, whose
    # passes depend on the tail (the profile in RESULTS.md counts them for one case).
    record(benchmark, device, n=n, d=d, m=m)
    run(benchmark, lambda: fns[contender](x, y), device, rounds=1 if contender != "relflat" else 3)


LAYER_CONTENDERS = ["relflat", "relflat-hvp", "fallback-hvp", "autograd-loop", "autograd-vectorized", "curvlinops-hutchinson"]


@pytest.mark.benchmark(group="layer-small (100-64-32-10, layer 2: 32x64)")
@pytest.mark.parametrize("contender", LAYER_CONTENDERS)
def test_small_mlp_layer(benchmark, contender, full, device):
    _layer_case(benchmark, contender, [100, 64, 32, 10], 10000 if full else 2000, device)


@pytest.mark.benchmark(group="layer-large (784-512-256-10, layer 2: 256x512)")
@pytest.mark.parametrize("contender", LAYER_CONTENDERS)
def test_large_mlp_layer(benchmark, contender, full, device):
    _layer_case(benchmark, contender, [784, 512, 256, 10], 10000 if full else 1000, device)
