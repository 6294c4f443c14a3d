"""The exact path's second-order chain rule (relflat_ext._chain_rule) == the authors' autograd
baseline, float64, for every supported activation, loss and tail shape, in Sequential and in traced
models; and the models it must leave to Hessian-vector products (relflat_ext._tail)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from models import assert_unchanged, data, snapshot, train_to_minimum
from relflat_ext.flatness import chain_rule, tail as _tail

ACTIVATIONS = [nn.Tanh(), nn.Sigmoid(), nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6(), nn.LeakyReLU(0.2),
               nn.ELU(0.7), nn.SELU(), nn.CELU(1.3), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Mish(),
               nn.Softplus(beta=2.0, threshold=1.0), nn.Softsign(), nn.Tanhshrink(), nn.Hardtanh(-0.5, 0.5),
               nn.Hardswish(), nn.LogSigmoid()]


def test_every_supported_elementwise_type_is_tested():
    assert {type(a) for a in ACTIVATIONS} == set(_tail.ELEMENTWISE)


def _deep(act, seed=0, k=4):
    """Layer "2" (7 -> 6) with a tail of two activations, dropout, identity and two Linear layers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 6), act, nn.Dropout(0.3), nn.Linear(6, 8),
                         act, nn.Identity(), nn.Linear(8, k)).double()


def _compare(model, layer, x, y, loss="cross_entropy", rtol=1e-10, how="Sequential"):
    """The chain rule against the baseline; rtol 1e-10 where 2e-14 is the largest error measured."""
    before = snapshot(model)
    fast = rf.relative_flatness(model, layer, x, y, loss=loss, method="exact", lmax=True, block_trace=True)
    assert_unchanged(model, before)
    assert "chain rule" in fast.reason and how in fast.reason, fast.reason
    base = rf.relative_flatness_autograd(model, layer, x, y, loss=loss, lmax=True, vectorize=True)
    assert abs(fast.kappa - base.kappa) <= rtol * abs(base.kappa), (fast.kappa, base.kappa)
    assert abs(fast.kappa_lmax - base.kappa_lmax) <= rtol * abs(base.kappa_lmax)
    torch.testing.assert_close(fast.block_trace, base.block_trace, rtol=rtol,
                               atol=rtol * base.block_trace.abs().max().item())
    return fast


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
def test_each_activation_matches_baseline(act):
    model = _deep(act)
    x, y = data(30, 5, 4, "cross_entropy", seed=3)
    _compare(model, "2", 2 * x, y)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
@pytest.mark.parametrize("layer", ["0", "2", "5"])
def test_each_loss_and_layer_matches_baseline(loss, layer):
    model = _deep(nn.Softplus(), seed=1)
    x, y = data(25, 5, 4, loss, seed=4)
    _compare(model, layer, x, y, loss)


PIECEWISE_LINEAR = [nn.ReLU(), nn.LeakyReLU(0.2), nn.ReLU6(), nn.Hardtanh(-0.5, 0.5)]


@pytest.mark.parametrize("act", PIECEWISE_LINEAR, ids=lambda a: repr(a))
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
@pytest.mark.parametrize("reverse", [True, False], ids=["from the output", "from z"])
def test_piecewise_linear_tails_give_the_baseline_from_either_end(act, loss, reverse, monkeypatch):
    """No curvature after the layer: the loss is the only source, and d out / dz may be carried from
    the output (k rows) or from z (d columns). Both equal the baseline, also where the model ends in
    an activation (the carried Jacobian then starts diagonal)."""
    monkeypatch.setattr(chain_rule, "reverse_is_cheaper", lambda tail, d, k: reverse)
    x, y = data(30, 5, 4, loss, seed=7)
    for layer in ("0", "2", "5"):
        _compare(_deep(act, seed=5), layer, 2 * x, y, loss)
    torch.manual_seed(6)
    ends_in_act = nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 4), act).double()
    _compare(ends_in_act, "0", 2 * x, torch.rand(30, 4, dtype=torch.float64), "mse")


def test_a_wide_relu_layer_under_a_narrow_head_is_carried_from_the_output():
    tail = [nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)]
    assert chain_rule.reverse_is_cheaper(tail, 256, 10)  # 10 rows carried, not 128 x 256 per sample
    assert not chain_rule.reverse_is_cheaper([nn.ReLU(), nn.Linear(8, 1000)], 8, 1000)  # wide output: from z
    assert not chain_rule.reverse_is_cheaper([nn.ReLU()], 8, 8)  # no Linear: the diagonal is cheapest


def test_a_trained_relu_network_keeps_float32_digits_from_the_output_end():
    """Where users are: a ReLU MLP trained to a confident minimum, measured in float32 through the
    path that carries d out / dz from the output, against float64 and the full Hessian."""
    x, y = data(64, 8, 4, "cross_entropy", seed=8)
    torch.manual_seed(8)
    model = train_to_minimum(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                                           nn.Linear(16, 4)).double(), x, y, steps=600, lr=0.02, below=1e-4)
    assert chain_rule.reverse_is_cheaper(list(model)[1:], 32, 4)
    wide = rf.relative_flatness(model, "0", x, y, lmax=True, block_trace=True)
    base = rf.relative_flatness_autograd(model, "0", x, y, lmax=True)
    assert wide.kappa == pytest.approx(base.kappa, rel=1e-10)
    narrow = rf.relative_flatness(copy.deepcopy(model).float(), "0", x.float(), y, lmax=True, block_trace=True)
    assert "chain rule" in narrow.reason
    for key in ("kappa", "kappa_lmax"):
        assert getattr(narrow, key) == pytest.approx(getattr(wide, key), rel=1e-5), key
    scale = wide.block_trace.abs().max()
    assert float((narrow.block_trace.double() - wide.block_trace).abs().max()) <= 1e-5 * float(scale)


def test_probability_targets_and_callable_losses():
    model = _deep(nn.GELU(), seed=2)
    x, y = data(20, 5, 4, "cross_entropy", seed=5)
    probs = torch.softmax(torch.randn(20, 4, dtype=torch.float64), dim=1)
    _compare(model, "2", x, probs)

    def quartic(out, target):  # dense per-sample output Hessians
        return F.smooth_l1_loss(out, target) + 0.1 * (out.sum(1) ** 4).mean()

    _compare(model, "2", x, torch.randn(20, 4, dtype=torch.float64), quartic)
    _compare(model, "8", x, torch.randn(20, 4, dtype=torch.float64), quartic)  # empty tail


def test_linear_tail_and_nested_sequentials():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh()),
                          nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 7), nn.Sequential(nn.Sigmoid(), nn.Linear(7, 3)))
                          ).double()
    x, y = data(20, 4, 3, "cross_entropy", seed=6)
    for layer in ("0.0", "1.0", "1.1"):
        _compare(model, layer, x, y)
    shared = nn.Linear(5, 5)  # a tail module used twice is still a chain
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(5, 3)).double()
    _compare(model, "0", x, y)


def test_batchnorm_with_running_statistics_in_the_tail():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5),
                          nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = data(30, 4, 3, "cross_entropy", seed=13)
    model.train()
    model(x)  # non-trivial running statistics
    for layer in ("0", "3"):
        _compare(model, layer, x, y)
    assert model.training


def test_prefix_may_hold_any_module():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Unflatten(1, (1, 12)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.LayerNorm(20),
                          nn.Linear(20, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = data(15, 12, 3, "cross_entropy", seed=7)
    _compare(model, "4", x, y)


def test_float32_agrees_with_float64():
    model = _deep(nn.Tanh(), seed=5, k=10)
    x, y = data(400, 5, 10, "cross_entropy", seed=8)
    want = rf.relative_flatness(model, "2", x, y).kappa
    got = rf.relative_flatness(model.float(), "2", x.float(), y).kappa
    assert abs(got - want) <= 2e-6 * abs(want)  # measured 1.9e-7


class _Subclass(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


def _hooked():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[1].register_forward_hook(lambda module, args, out: out * 1.5)
    return model


NOT_PLAIN = {"subclass": lambda: _Subclass(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
             "hook": _hooked,
             "unsupported tail": lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))}


@pytest.mark.parametrize("case", list(NOT_PLAIN))
def test_other_models_use_hessian_vector_products(case):
    torch.manual_seed(6)
    model, layer = NOT_PLAIN[case]().double(), "0"
    with torch.no_grad():
        assert _tail.plan(model.eval(), layer, model[0]) is None
    x, y = data(15, 4, 3, "cross_entropy", seed=9)
    fast = rf.relative_flatness(model, layer, x, y, method="exact")
    assert "Hessian-vector products" in fast.reason
    base = rf.relative_flatness_autograd(model, layer, x, y, vectorize=True)
    assert abs(fast.kappa - base.kappa) <= 1e-10 * abs(base.kappa)


class _Functional(nn.Module):
    """An MLP written with a forward of functional calls and tensor methods, as research code is."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 8), nn.Linear(8, 4)
        self.act = nn.ELU()

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        x = F.leaky_relu(self.fc3(x), 0.1).sigmoid()
        x = F.gelu(self.act(x), approximate="tanh")
        x = F.dropout(x, 0.3, training=self.training)  # measured in eval mode: the identity
        return self.fc4(F.softplus(x, beta=2.0))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_traced_functional_model_matches_baseline(loss):
    torch.manual_seed(7)
    model = _Functional().double()
    x, y = data(20, 5, 4, loss, seed=10)
    for layer in ("fc1", "fc2", "fc3"):
        _compare(model, layer, x, y, loss, how="traced")


class _Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc3(h + torch.tanh(self.fc2(h)))  # fc1's output reaches the loss twice


class _Stateful(nn.Module):
    """Its forward changes after the first call, so a trace (the first call) is wrong."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.calls = nn.Linear(4, 5), nn.Linear(5, 3), 0

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.fc1(x))
        return self.fc2(h * 3.0 if self.calls > 1 else h)


def test_traced_models_that_are_not_chains_use_hvps():
    torch.manual_seed(8)
    model = _Skip().double()
    x, y = data(15, 4, 3, "cross_entropy", seed=11)
    with torch.no_grad():
        assert _tail.plan(model.eval(), "fc1", model.fc1) is None
    fast = rf.relative_flatness(model, "fc1", x, y)
    assert "Hessian-vector products" in fast.reason
    base = rf.relative_flatness_autograd(model, "fc1", x, y, vectorize=True)
    assert abs(fast.kappa - base.kappa) <= 1e-10 * abs(base.kappa)


def test_a_trace_that_does_not_reproduce_the_model_is_not_used():
    torch.manual_seed(9)
    model = _Stateful().double()
    x, y = data(15, 4, 3, "cross_entropy", seed=12)
    with pytest.warns(RuntimeWarning, match="does not reproduce"):
        fast = rf.relative_flatness(model, "fc1", x, y)
    assert "Hessian-vector products" in fast.reason
    base = rf.relative_flatness_autograd(model, "fc1", x, y, vectorize=True)
    assert abs(fast.kappa - base.kappa) <= 1e-10 * abs(base.kappa)


class _LogSoftmaxNet(nn.Module):
    """The PyTorch MNIST example's shape: the model returns log-probabilities."""

    def __init__(self, as_method=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.as_method = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 4), as_method

    def forward(self, x):
        z = self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))
        return z.log_softmax(-1) if self.as_method else F.log_softmax(z, dim=1)


def _log_softmax_models(seed=0):
    torch.manual_seed(seed)
    seq = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4), nn.LogSoftmax(dim=1))
    return {"Sequential": (seq.double(), ("4", "2")), "traced": (_LogSoftmaxNet().double(), ("fc3", "fc2")),
            "traced method": (_LogSoftmaxNet(as_method=True).double(), ("fc3", "fc2"))}


@pytest.mark.parametrize("kind", ["Sequential", "traced", "traced method"])
@pytest.mark.parametrize("loss", ["cross_entropy", F.nll_loss, nn.NLLLoss()], ids=["ce", "F.nll_loss", "NLLLoss"])
def test_a_final_log_softmax_is_taken_into_the_cross_entropy(kind, loss):
    """cross_entropy(log_softmax(u)) = cross_entropy(u) = nll_loss(log_softmax(u)): a model that
    returns log-probabilities keeps the closed form (its last layer) and the chain rule (before it),
    against the full Hessian of the loss the user gave."""
    model, (last, middle) = _log_softmax_models()[kind]
    x, y = data(40, 5, 4, "cross_entropy", seed=3)
    for layer, path in ((last, "closed_form"), (middle, "exact")):
        res = rf.relative_flatness(model, layer, x, y, loss=loss, lmax=True, block_trace=True)
        assert res.method == path and "log_softmax taken into the cross entropy" in res.reason, res.reason
        base = rf.relative_flatness_autograd(model, layer, x, y, loss=loss, lmax=True)
        assert res.kappa == pytest.approx(base.kappa, rel=1e-10)
        assert res.kappa_lmax == pytest.approx(base.kappa_lmax, rel=1e-10)
        torch.testing.assert_close(res.block_trace, base.block_trace, rtol=1e-10, atol=1e-12)


def test_a_log_softmax_is_not_folded_where_it_changes_the_loss():
    """Label smoothing, a callable that is not nll_loss, a log_softmax over the wrong dim: the
    model's own output goes through Hessian-vector products (or a clear error)."""
    model, _ = _log_softmax_models()["Sequential"]
    x, y = data(40, 5, 4, "cross_entropy", seed=3)
    for loss in (nn.CrossEntropyLoss(label_smoothing=0.1), lambda out, t: F.nll_loss(out, t)):
        res = rf.relative_flatness(model, "2", x, y, loss=loss)
        assert "Hessian-vector products" in res.reason
        assert res.kappa == pytest.approx(rf.relative_flatness_autograd(model, "2", x, y, loss=loss).kappa, rel=1e-10)
    tokens = nn.Sequential(nn.Linear(5, 4), nn.LogSoftmax(dim=1)).double()  # over the sequence, not the classes
    with pytest.raises(ValueError, match="not over its classes"):
        rf.relative_flatness(tokens, "0", torch.randn(3, 6, 5, dtype=torch.float64), torch.randint(0, 4, (3, 6)))


class _InPlaceTail(nn.Module):
    """Not a Sequential: traced, with an in-place activation right after the layer (torchvision's
    ReLU(inplace=True) habit), which changes the layer's output tensor during the forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(5, 7), nn.ELU(inplace=True), nn.Linear(7, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_in_place_operations_after_the_layer():
    """The traced tail's check replays a copy of the layer output recorded before the model's
    in-place ELU ran (the chain rule is kept, without a warning); Hessian-vector products let the
    model work in place on a copy of their leaf (they raised "a leaf Variable that requires grad is
    being used in an in-place operation")."""
    torch.manual_seed(0)
    x, y = data(30, 5, 4, "cross_entropy", seed=2)
    traced = _InPlaceTail().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = rf.relative_flatness(traced, "fc1", x, y, lmax=True)
    assert "chain rule" in fast.reason and "traced" in fast.reason
    base = rf.relative_flatness_autograd(traced, "fc1", x, y, lmax=True)
    assert fast.kappa == pytest.approx(base.kappa, rel=1e-10)
    assert fast.kappa_lmax == pytest.approx(base.kappa_lmax, rel=1e-10)
    hvp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.LayerNorm(7), nn.Linear(7, 4)).double()
    res = rf.relative_flatness(hvp, "0", x, y, lmax=True)
    assert "Hessian-vector products" in res.reason
    assert res.kappa == pytest.approx(rf.relative_flatness_autograd(hvp, "0", x, y).kappa, rel=1e-10)


def test_a_trained_confident_log_softmax_model_in_float32():
    """Where users measure: the MNIST example's shape (log_softmax out, nll_loss), trained in float32
    to a train loss below 1e-3; both layers on the fast paths against the float64 full Hessian."""
    torch.manual_seed(0)
    model = _LogSoftmaxNet()
    x = data(60, 5, 4, "cross_entropy", seed=4, dtype=torch.float32)[0]
    y = (x @ torch.randn(5, 4, generator=torch.Generator().manual_seed(5))).argmax(1)  # learnable labels
    train_to_minimum(model, x, y, steps=1500, lr=0.05, loss=F.nll_loss)
    for layer, path in (("fc3", "closed_form"), ("fc2", "exact")):
        res = rf.relative_flatness(model, layer, x, y, loss=F.nll_loss)
        assert res.method == path and "log_softmax taken into" in res.reason
        base = rf.relative_flatness_autograd(copy.deepcopy(model).double(), layer, x.double(), y, loss=F.nll_loss)
        assert res.kappa == pytest.approx(base.kappa, rel=1e-5), (layer, res.kappa, base.kappa)
