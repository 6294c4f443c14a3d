"""Feature robustness by Monte Carlo against Theorem 5: E_F / (delta^2/(2m)) -> kappa_Tr."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from models import assert_unchanged, data, mlp, snapshot, train_to_minimum


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


class _Counted(nn.Identity):
    """An identity that counts the samples it sees: how much work the modules before the layer did
    (not torch.fx's symbolic pass, which sees a Proxy)."""
    rows = 0

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            _Counted.rows += x.shape[0]
        return x


class _Traced(nn.Module):
    """Not a Sequential: torch.fx traces it, and the tail after ``fc1`` is F.softplus and ``fc2``."""

    def __init__(self):
        super().__init__()
        self.count, self.fc0, self.fc1, self.fc2 = _Counted(), nn.Linear(6, 9), nn.Linear(9, 7), nn.Linear(7, 4)

    def forward(self, x):
        return self.fc2(F.softplus(self.fc1(torch.tanh(self.fc0(self.count(x))))))


class _InPlace(_Traced):
    """The traced tail after ``fc1`` begins with an in-place ELU, which changes the layer's output."""

    def __init__(self):
        super().__init__()
        self.act = nn.ELU(inplace=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(torch.tanh(self.fc0(self.count(x))))))


class _Tokens(nn.Module):
    """Token inputs, a token-wise tail after ``mid``, token targets."""

    def __init__(self):
        super().__init__()
        self.count, self.embed, self.mid, self.head = _Counted(), nn.Embedding(11, 6), nn.Linear(6, 8), nn.Linear(8, 11)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.count(self.embed(tokens)))))


def _cases():
    torch.manual_seed(0)
    x, y = data(40, 6, 4, "cross_entropy", seed=1)
    sequential = nn.Sequential(_Counted(), *mlp([6, 9, 7, 4], "tanh", seed=2))
    g = torch.Generator().manual_seed(3)
    tokens, targets = torch.randint(0, 11, (12, 5), generator=g), torch.randint(0, 11, (12, 5), generator=g)
    targets[0, :2] = -100
    log_probs = nn.Sequential(_Counted(), *mlp([6, 9, 4], "tanh", seed=4), nn.LogSoftmax(dim=1))
    return [("Sequential, middle layer", sequential, "3", x, y), ("Sequential, last layer", sequential, "5", x, y),
            ("traced", _Traced().double(), "fc1", x, y), ("tokens", _Tokens().double(), "mid", tokens, targets),
            ("log-probabilities out", log_probs, "1", x, y), ("in place", _InPlace().double(), "fc1", x, y)]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _cases()])
def test_tail_only_copies_give_the_whole_models_values(case):
    """Where the rest of the model is a tail of Linear and elementwise steps, the perturbed copies
    run only that tail, from one forward pass's features (the modules before the layer run once
    per batch): the same values, to rounding, as running the whole model per copy."""
    _, model, layer, x, y = _cases()[case]
    before = snapshot(model)
    _Counted.rows = 0
    fast = rf.feature_robustness(model, layer, x, y, delta=[1e-2, 0.5], n_samples=16, seed=0, kappa=1.0,
                                 batch_size=20)
    assert _Counted.rows == x.shape[0]  # one forward pass per batch
    with rf.hvp_only():  # no tail plans: the whole model per copy
        whole = rf.feature_robustness(model, layer, x, y, delta=[1e-2, 0.5], n_samples=16, seed=0, kappa=1.0,
                                      batch_size=20)
    assert _Counted.rows == x.shape[0] * (1 + 1 + 2 * 2 * 16)  # and once more per copy (2 deltas, 2 signs, 16 draws)
    for a, b in zip(fast, whole):
        torch.testing.assert_close(a.samples, b.samples, rtol=1e-10, atol=1e-18)
    assert_unchanged(model, before)


def _kappa_of_matrix(model, parameter, view, x, y):
    """Brute force: kappa_Tr of the weight seen as the (d, m) matrix ``view(weight)``, from the
    full Hessian of the mean cross entropy in that weight."""
    weight = dict(model.named_parameters())[parameter].detach()
    w = view(weight)
    d, m = w.shape
    hessian = torch.autograd.functional.hessian(
        lambda v: F.cross_entropy(torch.func.functional_call(model, {parameter: v}, (x,)), y), weight)
    # The Hessian in the matrix view: H[W] = J^T H[weight] J, the view being a permutation/reshape.
    index = view(torch.arange(weight.numel()).reshape(weight.shape)).reshape(-1)
    h = hessian.reshape(weight.numel(), weight.numel())[index][:, index].reshape(d, m, d, m)
    return float((w @ w.T * torch.einsum("smtm->st", h)).sum())


class _Convolutional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.head = nn.Linear(3 * 12 * 12, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.up(torch.tanh(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("layer, parameter, view", [
    ("conv", "conv.weight", lambda w: w.reshape(w.shape[0], -1)),  # rows act on patches: (out, in * 3 * 3)
    ("up", "up.weight", lambda w: w.reshape(w.shape[0], -1).T),     # (out * 2 * 2, in): on channel vectors
])
def test_theorem5_for_convolutions_through_the_weight(layer, parameter, view):
    """A layer whose features are not per-sample vectors is perturbed through its weight,
    ``W -> W (I + delta U)`` in kappa's (d, m) view; the small-delta limit agrees with kappa from
    the full Hessian within 4 standard errors."""
    torch.manual_seed(0)
    model = _Convolutional().double()
    x = torch.randn(30, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(2))
    kappa = _kappa_of_matrix(model, parameter, view, x, y)
    before = snapshot(model)
    fr = rf.feature_robustness(model, layer, x, y, delta=1e-3, n_samples=400, seed=0, kappa=kappa)
    assert fr.m == view(dict(model.named_parameters())[parameter]).shape[1]
    ratio, se = _ratio(fr)
    assert abs(ratio - kappa) <= 4 * se and se < 0.25 * kappa, (ratio, se, kappa)
    assert_unchanged(model, before)
    estimated = rf.feature_robustness(model, layer, x, y, delta=1e-3, n_samples=4, seed=0)
    assert estimated.kappa_stderr is not None and estimated.kappa_stderr > 0  # kappa estimated, with its error


def test_weight_perturbation_equals_feature_perturbation_on_a_linear_layer():
    """The same matrices through the weight (the Linear's weight named as a parameter) and through
    the features (the module, on token inputs, where a sample's tokens share one matrix) give the
    same values: ``W (I + A) phi = W ((I + A) phi)``."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.proj(x)).mean(1))

    torch.manual_seed(1)
    model = Tokens().double()
    x, y = torch.randn(40, 3, 6, dtype=torch.float64), torch.randint(0, 4, (40,))
    features = rf.feature_robustness(model, "proj", x, y, delta=[1e-2, 0.5], n_samples=8, seed=3, kappa=1.0)
    weight = rf.feature_robustness(model, "proj.weight", x, y, delta=[1e-2, 0.5], n_samples=8, seed=3, kappa=1.0)
    for a, b in zip(features, weight):
        torch.testing.assert_close(a.samples, b.samples, rtol=1e-9, atol=1e-16)


def test_wide_layers_draw_a_vector_per_sample():
    """A matrix per draw costs m^2 numbers and, for Haar draws, an m^3 QR: a CNN's first fully
    connected layer (m in the thousands) took minutes, and m = 25088 (VGG) did not fit. Each
    sample's ``U phi`` is drawn in law instead: the same expectation, by Theorem 5 kappa, and
    independent of how the data are batched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3000, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(60, 3000, dtype=torch.float64) / 30, torch.randint(0, 3, (60,))
    kappa = rf.relative_flatness(model, "0", x, y).kappa
    for distribution in ("orthogonal", "gaussian"):
        fr = rf.feature_robustness(model, "0", x, y, delta=1e-2, n_samples=64, seed=0, distribution=distribution,
                                   kappa=kappa)
        ratio, err = _ratio(fr)
        assert abs(ratio - kappa) <= 4 * err
    whole = rf.feature_robustness(model, "0", x, y, delta=0.1, n_samples=8, seed=1)
    batched = rf.feature_robustness(model, "0", x, y, delta=0.1, n_samples=8, seed=1, batch_size=7)
    torch.testing.assert_close(batched.samples, whole.samples, rtol=1e-9, atol=1e-15)


def test_recurrent_weight_matrix_against_the_full_hessian():
    """A recurrent layer's hidden-to-hidden matrix (named as a parameter): every step's state
    perturbed through the weight; Theorem 5 against the autograd baseline's kappa."""
    torch.manual_seed(0)
    rnn, head = nn.RNN(3, 5, batch_first=True).double(), nn.Linear(5, 3).double()
    model = nn.Sequential()
    model.rnn, model.head = rnn, head
    model.forward = lambda x: head(rnn(x)[0][:, -1])
    x = torch.randn(40, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2))
    kappa = rf.relative_flatness(model, "rnn.weight_hh_l0", x, y, method="autograd").kappa
    fr = rf.feature_robustness(model, "rnn.weight_hh_l0", x, y, delta=1e-3, n_samples=200, seed=0, kappa=kappa)
    ratio, se = _ratio(fr)
    assert abs(ratio - kappa) <= 4 * se, (ratio, se, kappa)


def test_tied_weight_perturbed_in_every_use_as_kappa_counts_it():
    """A weight held by two Linear layers: kappa is a function of the parameter (every use counts),
    so the perturbation goes through the weight, reaching both uses; Theorem 5 holds against the
    full Hessian. A hook on one module would perturb one use and miss the cross terms."""
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = data(60, 6, 3, "cross_entropy", seed=4)
    kappa = rf.relative_flatness(model, "0", x, y, method="autograd").kappa
    fr = rf.feature_robustness(model, "0", x, y, delta=1e-3, n_samples=300, seed=0, kappa=kappa)
    ratio, se = _ratio(fr)
    assert abs(ratio - kappa) <= 4 * se and se < 0.2 * abs(kappa), (ratio, se, kappa)


def test_trained_float32_convolution_at_a_confident_minimum():
    """Where users are: LeNet-5 trained on digits to a training loss below 1e-3, float32. The
    perturbation of conv2's patches through its weight at delta = 1e-2 agrees with kappa (the
    estimator on a float64 copy) within 4 combined standard errors."""
    sklearn = pytest.importorskip("sklearn.datasets")
    from relflat_ext.apps.training import fit
    from relflat_ext.apps.zoo import lenet5
    digits = sklearn.load_digits()
    x = torch.tensor(digits.images[:256], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target[:256])
    torch.manual_seed(0)
    trained = fit(lenet5(), (x, y), 300, stop_below=1e-3, batch_size=256, lr=1e-2)
    assert trained.reached
    kappa = rf.relative_flatness(copy.deepcopy(trained.model).double(), "3", x.double(), y, seed=0, rel_tol=0.05)
    fr = rf.feature_robustness(trained.model, "3", x, y, delta=1e-2, n_samples=200, seed=1, kappa=kappa.kappa)
    ratio, se = _ratio(fr)
    assert abs(ratio - kappa.kappa) <= 4 * math.hypot(se, kappa.kappa_stderr), (ratio, se, kappa)
    assert se < 0.1 * kappa.kappa


def test_a_model_returning_logits_and_features_with_a_loss_that_picks_the_logits():
    """Research models often return ``(logits, features)``; a callable loss picks the logits.
    Before: feature robustness crashed reshaping the tuple."""
    class Both(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            h = torch.tanh(self.net[0](x))
            return self.net[2](h), h

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    both = Both(net)
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    pick = lambda out, target: F.cross_entropy(out[0], target)  # noqa: E731
    for layer in ("0", "2"):
        plain = rf.feature_robustness(net, layer, x, y, delta=0.05, seed=3, n_samples=32)
        picked = rf.feature_robustness(both, f"net.{layer}", x, y, loss=pick, delta=0.05, seed=3, n_samples=32)
        assert picked.value == pytest.approx(plain.value, rel=1e-9)
        assert picked.kappa == pytest.approx(plain.kappa, rel=1e-9)


def test_float32_at_a_confident_minimum_and_small_delta_agrees_with_float64():
    """E_F at delta = 1e-3 is about 1e-9 of a loss near 1e-4: below float32's resolution of the
    per-sample losses, whose rounding biased it (the head: -0.34 +- 0.04 against 0.120 in float64).
    The losses of the float32 outputs are taken in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    x, y = torch.randn(300, 20), torch.randint(0, 5, (300,))
    train_to_minimum(net, x, y, steps=300, lr=1e-2)
    wide = copy.deepcopy(net).double()
    for layer in ("0", "4"):
        low = rf.feature_robustness(net, layer, x, y, delta=1e-3, seed=0, n_samples=32, kappa=1.0)
        high = rf.feature_robustness(wide, layer, x.double(), y, delta=1e-3, seed=0, n_samples=32, kappa=1.0)
        assert abs(low.value - high.value) <= 4 * math.hypot(low.stderr, high.stderr)


def test_progress_counts_the_draws_over_the_batches(capsys):
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(40, 6, 4, "cross_entropy", seed=0)
    rf.feature_robustness(model, "2", x, y, delta=0.1, n_samples=6, seed=0, kappa=1.0, batch_size=20, progress=True)
    assert "12/12 draws x batches (feature robustness of '2'" in capsys.readouterr().err
