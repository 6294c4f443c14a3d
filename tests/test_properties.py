"""Properties from the paper: reparameterization invariance (Sec. 4, Theorem 4), the OLS/ridge
identity, and that how the data is fed (tensors, DataLoader, chunk sizes) does not matter."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import relflat_ext as rf
from models import data, mlp
from relflat_ext.flatness import chain_rule as _chain_rule, tail as _tail


def _relu_net(seed=0):
    return mlp([5, 8, 7, 4], "relu", seed=seed)  # Linear "0", "2", "4"


def _kappa(model, layer, x, y, **kw):
    return rf.relative_flatness(model, layer, x, y, **kw).kappa


@torch.no_grad()
def _scale_neurons(model, layer, next_layer, factors):
    """Multiply the output neurons of `layer` (rows and bias) by factors, divide the matching
    input columns of `next_layer`: a ReLU network computes the same function."""
    model[int(layer)].weight.mul_(factors[:, None])
    model[int(layer)].bias.mul_(factors)
    model[int(next_layer)].weight.div_(factors[None, :])


@pytest.mark.parametrize("feature_layer", ["2", "4"])
def test_layerwise_reparameterization_invariance(feature_layer):
    model = _relu_net(1)
    x, y = data(60, 5, 4, "cross_entropy")
    before = _kappa(model, feature_layer, x, y)
    out_before = model(x)
    alpha = torch.tensor(7.3, dtype=torch.float64)
    prev = str(int(feature_layer) - 2)
    _scale_neurons(model, prev, feature_layer, alpha.expand(model[int(prev)].out_features))
    torch.testing.assert_close(model(x), out_before)
    after = _kappa(model, feature_layer, x, y)
    assert abs(after - before) <= 1e-9 * abs(before)


def test_neuronwise_invariance_of_non_feature_layers():
    model = _relu_net(2)
    x, y = data(60, 5, 4, "cross_entropy")
    before = _kappa(model, "2", x, y)
    out_before = model(x)
    g = torch.Generator().manual_seed(0)
    _scale_neurons(model, "2", "4", torch.rand(7, generator=g, dtype=torch.float64) * 20 + 0.05)  # the layer's own outputs
    _scale_neurons(model, "0", "2", torch.full((8,), 3.0, dtype=torch.float64))  # layer-wise below it
    torch.testing.assert_close(model(x), out_before)
    assert abs(_kappa(model, "2", x, y) - before) <= 1e-9 * abs(before)


def test_feature_neuron_rescaling_needs_normalization():
    """Rescaling the feature layer's neurons (the inputs of W) changes kappa, but not the
    Theorem 4 normalized kappa."""
    model = _relu_net(3)
    x, y = data(60, 5, 4, "cross_entropy")
    plain = _kappa(model, "2", x, y)
    normalized = _kappa(model, "2", x, y, normalize_features=True)
    out_before = model(x)
    g = torch.Generator().manual_seed(1)
    _scale_neurons(model, "0", "2", torch.rand(8, generator=g, dtype=torch.float64) * 10 + 0.1)
    torch.testing.assert_close(model(x), out_before)
    assert abs(_kappa(model, "2", x, y) - plain) > 1e-3 * abs(plain)
    assert abs(_kappa(model, "2", x, y, normalize_features=True) - normalized) <= 1e-9 * abs(normalized)


@pytest.mark.parametrize("layer", ["0", "2"])
def test_normalized_kappa_matches_transformed_baseline(layer):
    model = mlp([5, 6, 4], "tanh", seed=4)
    x, y = data(30, 5, 4, "cross_entropy")
    fast = rf.relative_flatness(model, layer, x, y, normalize_features=True, lmax=True)
    base = rf.relative_flatness_autograd(model, layer, x, y, normalize_features=True, lmax=True, vectorize=True)
    assert abs(fast.kappa - base.kappa) <= 1e-8 * abs(base.kappa)
    assert abs(fast.kappa_lmax - base.kappa_lmax) <= 1e-8 * abs(base.kappa_lmax)
    features = x if layer == "0" else model[1](model[0](x)).detach()
    torch.testing.assert_close(fast.feature_scale, features.std(0, unbiased=False))


@pytest.mark.parametrize("d", [1, 3])
def test_ols_ridge_identity(d):
    """Linear model + MSE: kappa = (2 / (n d)) ||W||_F^2 sum_i ||x_i||^2, for d = 1 the ridge
    penalty 2 ||w||^2 mean ||x||^2 (Sec. 3 of the paper)."""
    model = mlp([6, d], seed=d)
    x, y = data(40, 6, d, "mse", seed=d)
    expected = 2.0 / (40 * d) * model[0].weight.pow(2).sum().item() * x.pow(2).sum().item()
    for method in ("closed_form", "exact", "autograd"):
        got = rf.relative_flatness(model, "0", x, y, loss="mse", method=method).kappa
        assert abs(got - expected) <= 1e-10 * expected, method


def test_dataloader_chunking_and_a_single_pair_do_not_change_the_result():
    model = mlp([5, 6, 4, 3], "tanh", seed=6)
    x, y = data(53, 5, 3, "cross_entropy")
    for layer in ("0", "4"):
        whole = rf.relative_flatness(model, layer, x, y, lmax=True)
        chunked = rf.relative_flatness(model, layer, x, y, lmax=True, batch_size=7)
        loader = rf.relative_flatness(model, layer, DataLoader(TensorDataset(x, y), batch_size=10), lmax=True)
        pair = rf.relative_flatness(model, layer, [x, y], lmax=True)  # one batch as a DataLoader yields it
        for other in (chunked, loader, pair):
            assert other.n == 53
            assert abs(other.kappa - whole.kappa) <= 1e-12 * abs(whole.kappa)
            assert abs(other.kappa_lmax - whole.kappa_lmax) <= 1e-12 * abs(whole.kappa_lmax)
            torch.testing.assert_close(other.block_trace, whole.block_trace)


def test_hvp_block_size_does_not_change_the_result(monkeypatch):
    from relflat_ext.flatness import exact
    model = mlp([5, 9, 6, 3], "softplus", seed=9)
    x, y = data(20, 5, 3, "cross_entropy")
    with _tail.hvp_only():
        big = rf.relative_flatness(model, "2", x, y)
        monkeypatch.setattr(exact, "HVP_BLOCK_ELEMENTS", 20 * 6 * 2)  # 2 probes at a time
        monkeypatch.setattr(exact, "EXACT_CPU_CHUNK_ELEMENTS", 7 * 6)  # sub-batches of 7 samples
        small = rf.relative_flatness(model, "2", x, y)
    assert "Hessian-vector products" in small.reason
    assert abs(small.kappa - big.kappa) <= 1e-12 * abs(big.kappa)


def test_tail_chunk_size_does_not_change_the_result(monkeypatch):
    model = mlp([5, 9, 6, 7, 3], "tanh", seed=9)
    x, y = data(20, 5, 3, "cross_entropy")
    big = rf.relative_flatness(model, "2", x, y, lmax=True)
    monkeypatch.setattr(_chain_rule, "CHUNK_ELEMENTS", 7 * 6 * 6)  # 6 samples at a time
    small = rf.relative_flatness(model, "2", x, y, lmax=True)
    assert "chain rule" in small.reason
    assert abs(small.kappa - big.kappa) <= 1e-12 * abs(big.kappa)
    assert abs(small.kappa_lmax - big.kappa_lmax) <= 1e-12 * abs(big.kappa_lmax)
    torch.testing.assert_close(small.block_trace, big.block_trace, rtol=1e-12, atol=0)


def test_batchnorm_model_measured_in_eval_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    x, y = data(30, 4, 3, "cross_entropy")
    model.train()
    model(x)  # non-trivial running statistics
    fast = rf.relative_flatness(model, "0", x, y)
    base = rf.relative_flatness_autograd(model, "0", x, y, vectorize=True)
    assert model.training
    assert abs(fast.kappa - base.kappa) <= 1e-8 * abs(base.kappa)
