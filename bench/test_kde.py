"""Gaussian KDE: the fused kernel vs scikit-learn's KernelDensity vs chunked torch.cdist + logsumexp.
Each contender is checked against an exact float64 evaluation before it is timed (scikit-learn only
where its tree is exact: see tests/test_kde.py)."""
import math

import pytest
import torch

import relflat_ext as rf

from bench.common import record, run

M = 84
BANDWIDTHS = torch.logspace(0.0, 1.0, 8)  # around the nearest-neighbour scale of 84-dim N(0, I) data
FOLDS = 10


def _data(n, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, M, generator=g, dtype=dtype).to(device),
            torch.randn(n, M, generator=g, dtype=dtype).to(device))


def torch_kde(train, test, h, chunk=1024):
    """What one writes in PyTorch: distances by cdist in chunks of queries, then logsumexp."""
    n, m = train.shape
    const = -math.log(n) - m * math.log(h) - 0.5 * m * math.log(2 * math.pi)
    out = [torch.logsumexp(torch.cdist(test[s:s + chunk], train).square_().mul_(-0.5 / h ** 2), 1)
           for s in range(0, test.shape[0], chunk)]
    return torch.cat(out) + const


def torch_kfold_many(x, hs, folds):
    """The torch version of k-fold x B bandwidths: one loop over folds and bandwidths."""
    ids = rf.generalization.kfold_ids(x.shape[0], folds, x.device)
    out = torch.empty(len(hs), x.shape[0], dtype=x.dtype, device=x.device)
    for f in range(folds):
        held = ids == f
        for b, h in enumerate(hs.tolist()):
            out[b, held] = torch_kde(x[~held], x[held], h)
    return out


@pytest.mark.benchmark(group="kde-one-bandwidth")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("contender", ["relflat", "torch-cdist-logsumexp", "sklearn"])
def test_kde_one_bandwidth(benchmark, contender, dtype, full, device):
    n = (20000 if device.type == "cuda" else 5000) if full else 1500
    benchmark.group = f"kde {n} x {n}, m={M}, one bandwidth, {str(dtype)[6:]}"
    if contender == "sklearn" and (dtype == torch.float32 or n > 5000):
        pytest.skip("scikit-learn computes in float64 on the CPU (and takes minutes at 20000)")
    train, test = _data(n, dtype, device=device)
    h = 4.0  # moderate: scikit-learn's tree is exact here
    exact = torch_kde(train.double(), test.double(), h)
    if contender == "sklearn":
        from sklearn.neighbors import KernelDensity
        kd = KernelDensity(kernel="gaussian", bandwidth=h).fit(train.cpu().numpy())
        test_np = test.cpu().numpy()
        fn = lambda: kd.score_samples(test_np)
        got = torch.from_numpy(fn()).to(device)
    else:
        fn = {"relflat": lambda: rf.kde_log_density(train, test, h),
              "torch-cdist-logsumexp": lambda: torch_kde(train, test, h)}[contender]
        got = fn()
    tol = 1e-8 if dtype == torch.float64 else 2e-5 * exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() <= tol
    # Work model: the distance GEMM; every pair's exp is the other half of the cost.
    record(benchmark, device, flops=2.0 * n * n * M, pairs=n * n, exps=n * n)
    run(benchmark, fn, device, rounds=1 if contender == "sklearn" else 5)


@pytest.mark.benchmark(group="kde-10-folds-8-bandwidths")
@pytest.mark.parametrize("contender", ["relflat-one-call", "torch-loop"])
def test_kde_folds_and_bandwidths(benchmark, contender, full, device):
    n = (20000 if device.type == "cuda" else 5000) if full else 1500
    benchmark.group = f"kde {n} points, m={M}, {FOLDS} folds x {len(BANDWIDTHS)} bandwidths, fp32"
    x, _ = _data(n, device=device)
    bws = BANDWIDTHS.to(device)
    exact = torch_kfold_many(x.double(), bws.double(), FOLDS)
    ids = rf.generalization.kfold_ids(n, FOLDS, device)
    fns = {"relflat-one-call": lambda: rf.ops.gaussian_kernel_reduce(x, x, None, bws, None, ids[None],
                                                                   ids[None])[0][0],
           "torch-loop": lambda: torch_kfold_many(x, bws, FOLDS)}
    got = fns[contender]()
    assert (got.double() - exact).abs().max().item() <= 2e-5 * exact.abs().max().item()
    record(benchmark, device, flops=2.0 * n * n * M, exps=n * n * len(BANDWIDTHS))
    run(benchmark, fns[contender], device, rounds=3)
