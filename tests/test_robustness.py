"""Feature robustness by Monte Carlo against Theorem 5: E_F / (delta^2/(2m)) -> kappa_Tr."""
import math

import pytest
import torch

import relflat_ext as rf
from models import assert_unchanged, data, mlp, snapshot


def _ratio(fr):
    s = fr.delta ** 2 / (2 * fr.m)
    return fr.value / s, fr.stderr / s


@pytest.mark.parametrize("distribution", ["orthogonal", "gaussian"])
@pytest.mark.parametrize("seed, layer, loss", [(0, "2", "cross_entropy"), (1, "0", "cross_entropy"),
                                                (2, "2", "mse"), (3, "4", "bce_with_logits")])
def test_theorem5_small_delta_limit(seed, layer, loss, distribution):
    """On random networks (not at a minimum) the antithetic estimate at delta = 1e-2 agrees with
    kappa within 3 standard errors, and the standard error is a few percent of kappa."""
    model = mlp([6, 8, 7, 4] if layer != "4" else [6, 8, 7, 5, 4], "tanh", seed=seed)
    x, y = data(150, 6, 4, loss, seed=seed)
    fr = rf.feature_robustness(model, layer, x, y, delta=1e-2, loss=loss, distribution=distribution,
                               n_samples=200, seed=seed)
    ratio, se = _ratio(fr)
    assert fr.kappa > 0 and se < 0.1 * fr.kappa
    assert abs(ratio - fr.kappa) <= 3 * se, (ratio, se, fr.kappa)
    assert fr.predicted == pytest.approx(1e-4 / (2 * fr.m) * fr.kappa)


def test_agreement_degrades_as_delta_grows():
    """Same draws for every delta, so the differences between deltas are nearly noise-free: the
    deviation from the small-delta limit grows with delta (the higher-order terms are real) and at
    delta = 3 it is far outside the Monte Carlo error."""
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(150, 6, 4, "cross_entropy", seed=0)
    frs = rf.feature_robustness(model, "2", x, y, delta=[1e-2, 0.3, 1.0, 3.0], n_samples=200, seed=0)
    ratios = [_ratio(f)[0] for f in frs]
    devs = [abs(r - ratios[0]) for r in ratios[1:]]
    assert devs[0] < devs[1] < devs[2]
    assert abs(ratios[-1] - frs[0].kappa) > 3 * _ratio(frs[-1])[1]


def test_antithetic_pairs_remove_the_first_order_noise():
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(150, 6, 4, "cross_entropy", seed=0)
    anti = rf.feature_robustness(model, "2", x, y, delta=1e-2, n_samples=64, seed=0)
    plain = rf.feature_robustness(model, "2", x, y, delta=1e-2, n_samples=64, seed=0, antithetic=False)
    assert plain.stderr > 10 * anti.stderr


def test_streaming_batches_and_seed_reproduce_the_same_value():
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(90, 6, 4, "cross_entropy", seed=0)
    whole = rf.feature_robustness(model, "2", x, y, delta=0.1, n_samples=16, seed=5)
    batched = rf.feature_robustness(model, "2", x, y, delta=0.1, n_samples=16, seed=5, batch_size=32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=25)
    streamed = rf.feature_robustness(model, "2", loader, delta=0.1, n_samples=16, seed=5)
    assert batched.value == pytest.approx(whole.value, rel=1e-10)
    assert streamed.value == pytest.approx(whole.value, rel=1e-10)
    assert whole.kappa == pytest.approx(rf.relative_flatness(model, "2", x, y).kappa)


def test_haar_draws_are_orthogonal_and_gaussian_draws_have_variance_one_over_m():
    g = torch.Generator().manual_seed(0)
    u = rf.generalization.random_perturbations(50, 7, "orthogonal", g, torch.float64, "cpu")
    torch.testing.assert_close(u @ u.transpose(1, 2), torch.eye(7, dtype=torch.float64).expand(50, 7, 7))
    gauss = rf.generalization.random_perturbations(400, 7, "gaussian", g, torch.float64, "cpu")
    assert gauss.var().item() == pytest.approx(1 / 7, rel=0.05)


def test_model_is_left_unchanged():
    model = mlp([6, 8, 7, 4], "tanh", seed=0).train()
    before = snapshot(model)
    x, y = data(40, 6, 4, "cross_entropy")
    rf.feature_robustness(model, "2", x, y, delta=[0.1, 0.2], n_samples=4, seed=0)
    assert_unchanged(model, before)
    assert not model[2]._forward_pre_hooks


@pytest.mark.parametrize("kwargs, match", [
    (dict(delta=0.0), "delta"), (dict(delta=[]), "delta"), (dict(delta=[0.1, -1.0]), "delta"),
    (dict(distribution="uniform"), "distribution"), (dict(n_samples=1), "n_samples"),
    (dict(layer="9"), "not in the model"), (dict(loss="hinge"), "loss must be"),
])
def test_bad_input_is_rejected_clearly(kwargs, match):
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(20, 6, 4, "cross_entropy")
    args = dict(layer="2", delta=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rf.feature_robustness(model, args.pop("layer"), x, y, **args)
    with pytest.raises(ValueError, match="NaN"):
        rf.feature_robustness(model, "2", torch.full_like(x, math.nan), y, delta=0.1)


def test_batches_of_different_sizes_see_the_same_matrices():
    """Forward chunks depend on the batch size (here 234 draws per forward for one batch of 70, 256
    for a batch of 64): the matrices must not."""
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(70, 6, 4, "cross_entropy", seed=1)
    whole = rf.feature_robustness(model, "2", x, y, delta=0.1, n_samples=300, seed=2)
    batched = rf.feature_robustness(model, "2", x, y, delta=0.1, n_samples=300, seed=2, batch_size=64)
    torch.testing.assert_close(batched.samples, whole.samples, rtol=1e-9, atol=1e-15)
