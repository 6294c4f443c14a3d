"""The fused Gaussian kernel reduction: kernel == fallback == exact sums; KDE == scikit-learn where
scikit-learn is exact; bandwidth selection == GridSearchCV."""
import math

import numpy as np
import pytest
import torch

import relflat_ext as rf
from relflat_ext.ops import reference as ref
from relflat_ext import ops
from relflat_ext.ops import HAS_EXTENSION
from testing import DEVICES, DTYPES, assert_matches_reference

CASES = [  # nq, nk, m, c, B, R, key_scale, splits
    (1, 1, 1, 0, 1, 1, False, False),
    (5, 300, 3, 2, 1, 1, False, False),
    (130, 600, 84, 10, 1, 1, False, False),
    (70, 257, 17, 3, 4, 1, True, False),
    (64, 129, 5, 0, 3, 2, False, True),
    (100, 300, 9, 4, 8, 3, True, True),
    (33, 513, 300, 1, 2, 1, True, True),
]


def _kde_inputs(nq, nk, m, c, n_bw, n_splits, scale, splits, dtype, device, seed=0, bw_range=(-1.0, 1.0)):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, m, generator=g, dtype=torch.float64) + 3.0  # off-centre: exercises the centring
    k = torch.randn(nk, m, generator=g, dtype=torch.float64) + 3.0
    v = torch.randn(nk, c, generator=g, dtype=torch.float64) if c else None
    bw = torch.logspace(*bw_range, n_bw, dtype=torch.float64) * math.sqrt(m)
    ks = torch.rand(nk, generator=g, dtype=torch.float64) + 0.5 if scale else None
    qs = torch.randint(0, 4, (n_splits, nq), generator=g) if splits else None
    kss = torch.randint(0, 4, (n_splits, nk), generator=g) if splits else None
    conv = lambda t: None if t is None else (t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device))
    return [conv(t) for t in (q, k, v, bw, ks, qs, kss)]


def _assert_kde_matches(got, ref32, ref64, what):
    (ld, wv), (ld32, wv32), (ld64, wv64) = got, ref32, ref64
    finite = torch.isfinite(ld64.cpu())
    assert torch.equal(torch.isfinite(ld.cpu()), finite), f"{what}: -inf pattern differs"
    assert bool((ld.cpu()[~finite] == -math.inf).all()), f"{what}: unseen queries must give -inf"
    assert_matches_reference(ld.cpu()[finite], ld32.cpu()[finite], ld64.cpu()[finite], f"{what} logdens")
    assert_matches_reference(wv, wv32, wv64, f"{what} wval")


@pytest.mark.skipif(not HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_fallback(case, dtype, device):
    args = _kde_inputs(*case, dtype, device)
    args64 = _kde_inputs(*case, torch.float64, device)
    got = torch.ops.relflat.gaussian_kernel_reduce(*args)
    _assert_kde_matches(got, ref.gaussian_kernel_reduce(*args), ref.gaussian_kernel_reduce(*args64), str(case))


@pytest.mark.skipif(not HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bw_range", [(-4.0, -2.0), (3.0, 6.0)], ids=["tiny", "huge"])
def test_kernel_is_safe_at_extreme_bandwidths(bw_range, dtype, device):
    case = (40, 300, 6, 3, 3, 2, True, True)
    args = _kde_inputs(*case, dtype, device, bw_range=bw_range)
    args64 = _kde_inputs(*case, torch.float64, device, bw_range=bw_range)
    got = torch.ops.relflat.gaussian_kernel_reduce(*args)
    assert not torch.isnan(got[0]).any() and not torch.isnan(got[1]).any()
    _assert_kde_matches(got, ref.gaussian_kernel_reduce(*args), ref.gaussian_kernel_reduce(*args64), str(bw_range))


@pytest.mark.parametrize("device", DEVICES)
def test_queries_that_see_no_key_get_minus_inf_and_zeros(device):
    q = torch.randn(4, 3, dtype=torch.float64, device=device)
    k = torch.randn(5, 3, dtype=torch.float64, device=device)
    v = torch.randn(5, 2, dtype=torch.float64, device=device)
    qs = torch.tensor([[0, 0, 1, 1]], device=device)
    ks = torch.zeros((1, 5), dtype=torch.long, device=device)  # queries 0, 1 share every key's id
    ld, wv = ops.gaussian_kernel_reduce(q, k, v, torch.tensor([1.0], dtype=torch.float64, device=device), None, qs, ks)
    assert (ld[0, 0, :2] == -math.inf).all() and (wv[0, 0, :2] == 0).all()
    assert torch.isfinite(ld[0, 0, 2:]).all()
    dens = rf.kde_log_density(k, q[2:], 1.0)
    torch.testing.assert_close(ld[0, 0, 2:], dens, rtol=1e-12, atol=1e-12)


def test_no_keys_at_all():
    ld, wv = ops.gaussian_kernel_reduce(torch.randn(3, 2), torch.randn(0, 2), torch.randn(0, 4), torch.tensor([1.0]))
    assert ld.shape == (1, 1, 3) and (ld == -math.inf).all() and wv.shape == (1, 1, 3, 4) and (wv == 0).all()


@pytest.mark.skipif(not HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("with_values", [True, False])
def test_opcheck(with_values):
    args = _kde_inputs(20, 30, 4, 2 if with_values else 0, 2, 2, True, True, torch.float64, "cpu")
    torch.library.opcheck(torch.ops.relflat.gaussian_kernel_reduce.default, tuple(args))
    torch.library.opcheck(torch.ops.relflat.gaussian_kernel_reduce.default,
                          (args[0], args[1], args[2], args[3], None, None, None))


def _exact_log_density(train, test, h):
    """float64, the plain formula term by term."""
    train, test = train.double(), test.double()
    m = train.shape[1]
    d2 = ((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)
    terms = -d2 / (2 * h * h) - m * math.log(h) - 0.5 * m * math.log(2 * math.pi)
    return torch.logsumexp(terms, 1) - math.log(train.shape[0])


@pytest.mark.parametrize("h", [1e-3, 0.05, 0.5, 3.0, 100.0])
@pytest.mark.parametrize("m", [1, 4, 30])
def test_kde_log_density_equals_exact_sum(m, h):
    g = torch.Generator().manual_seed(m)
    train = torch.randn(200, m, generator=g, dtype=torch.float64)
    test = torch.cat([torch.randn(50, m, generator=g, dtype=torch.float64), train[:5] + 1e-4])
    got = rf.kde_log_density(train, test, h)
    assert got.shape == (55,)
    torch.testing.assert_close(got, _exact_log_density(train, test, h), rtol=0, atol=1e-8)


def test_kde_many_bandwidths_at_once_equal_one_at_a_time():
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(300, 5, generator=g, dtype=torch.float64), torch.randn(40, 5, generator=g, dtype=torch.float64)
    hs = torch.tensor([0.1, 0.4, 2.0], dtype=torch.float64)
    many = rf.kde_log_density(train, test, hs)
    assert many.shape == (3, 40)
    for b, h in enumerate(hs.tolist()):
        torch.testing.assert_close(many[b], rf.kde_log_density(train, test, h), rtol=0, atol=1e-12)


@pytest.mark.parametrize("h", [0.5, 1.0, 2.0])
def test_kde_matches_sklearn_at_moderate_bandwidths(h):
    from sklearn.neighbors import KernelDensity
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(400, 3)), rng.normal(size=(60, 3))
    sk = KernelDensity(kernel="gaussian", bandwidth=h).fit(train).score_samples(test)
    ours = rf.kde_log_density(torch.from_numpy(train), torch.from_numpy(test), h).numpy()
    np.testing.assert_allclose(ours, sk, rtol=0, atol=1e-7)


def test_kde_is_exact_where_sklearn_is_not():
    """In 84 dimensions (a LeNet head's features) every query is far from every kernel centre in
    units of the bandwidth; scikit-learn's tree estimate (default tolerances) is then off by tens of
    units of log-density, while the fused kernel equals the exact float64 sum."""
    from sklearn.neighbors import KernelDensity
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(500, 84)), rng.normal(size=(20, 84))
    sk = KernelDensity(kernel="gaussian", bandwidth=1.0).fit(train).score_samples(test)
    ours = rf.kde_log_density(torch.from_numpy(train), torch.from_numpy(test), 1.0)
    exact = _exact_log_density(torch.from_numpy(train), torch.from_numpy(test), 1.0)
    torch.testing.assert_close(ours, exact, rtol=0, atol=1e-8)
    assert np.abs(sk - exact.numpy()).max() > 1.0


@pytest.mark.parametrize("folds", [2, 5, 10])
def test_select_bandwidth_picks_what_gridsearchcv_picks(folds):
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KernelDensity
    rng = np.random.default_rng(folds)
    x = np.concatenate([rng.normal(size=(150, 2)), rng.normal(loc=4.0, scale=0.3, size=(53, 2))])
    grid = np.logspace(-1.5, 0.5, 15)
    search = GridSearchCV(KernelDensity(kernel="gaussian"), {"bandwidth": grid}, cv=folds).fit(x)
    sel = rf.select_bandwidth(torch.from_numpy(x), torch.from_numpy(grid), folds=folds)
    assert sel.bandwidth == pytest.approx(search.best_params_["bandwidth"])
    # Scores agree where the tree is exact: from the best bandwidth up (at small bandwidths the
    # tree overestimates the density, as in the test above).
    exact = grid >= sel.bandwidth
    np.testing.assert_allclose(sel.scores.numpy()[exact], search.cv_results_["mean_test_score"][exact], rtol=1e-6)


def test_all_folds_in_one_pass_equal_each_fold_alone():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(97, 4, generator=g, dtype=torch.float64)
    ids = rf.generalization.kfold_ids(97, 5)
    ld, _ = ops.gaussian_kernel_reduce(x, x, None, torch.tensor([0.7], dtype=torch.float64), None, ids[None], ids[None])
    for f in range(5):
        held = ids == f
        torch.testing.assert_close(ld[0, 0, held], rf.kde_log_density(x[~held], x[held], 0.7), rtol=0, atol=1e-10)


def test_values_are_the_nadaraya_watson_average():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    v = torch.randn(50, 2, generator=g, dtype=torch.float64)
    scale = torch.rand(50, generator=g, dtype=torch.float64) + 0.5
    _, wv = ops.gaussian_kernel_reduce(q, k, v, torch.tensor([0.8], dtype=torch.float64), scale)
    h = 0.8 * scale
    logw = -torch.cdist(q, k).square() / (2 * h * h) - 3 * torch.log(h)
    torch.testing.assert_close(wv[0, 0], torch.softmax(logw, 1) @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (dict(keys=torch.randn(5, 4)), "keys must be"),
    (dict(bandwidths=torch.tensor([0.0])), "bandwidths must be positive"),
    (dict(bandwidths=torch.tensor([-1.0, 1.0])), "bandwidths must be positive"),
    (dict(bandwidths=torch.tensor([])), "at least one"),
    (dict(key_scale=torch.zeros(5)), "key_scale must be positive"),
    (dict(values=torch.randn(4, 2)), "values must be"),
    (dict(query_split=torch.zeros(1, 6, dtype=torch.long)), "given together"),
    (dict(query_split=torch.zeros(1, 6), key_split=torch.zeros(1, 5)), "integer"),
    (dict(query_split=torch.zeros(1, 7, dtype=torch.long), key_split=torch.zeros(1, 5, dtype=torch.long)), r"\(R, 6\)"),
    (dict(queries=torch.randn(6, 3, dtype=torch.float64)), "dtype"),
])
def test_op_errors_name_the_argument(bad, match):
    args = dict(queries=torch.randn(6, 3), keys=torch.randn(5, 3), values=None, bandwidths=torch.tensor([1.0]),
                key_scale=None, query_split=None, key_split=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.gaussian_kernel_reduce(**args)


def test_kde_api_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        rf.kde_log_density(x, x, 0.0)
    with pytest.raises(ValueError, match="test must have m = 3"):
        rf.kde_log_density(x, torch.randn(4, 2), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        rf.kde_log_density(x, torch.full((2, 3), float("nan")), 1.0)
    with pytest.raises(ValueError, match="empty"):
        rf.kde_log_density(torch.randn(0, 3), x, 1.0)
    with pytest.raises(ValueError, match="folds"):
        rf.select_bandwidth(x, [0.5, 1.0], folds=11)
