"""relative_flatness (closed form and exact paths) == the authors' autograd baseline, float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from relflat_ext.flatness import tail as _tail
from models import data, linear_names, mlp

LOSSES = ["cross_entropy", "mse", "bce_with_logits"]
NETWORKS = [([6, 5, 4], "tanh"), ([5, 7, 6, 3], "softplus"), ([4, 6, 5, 4, 3], "gelu")]


def _close(a, b, rtol=1e-8):
    assert abs(a - b) <= rtol * max(abs(b), 1e-12), f"{a} vs {b}"


@pytest.mark.parametrize("widths, act", NETWORKS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_layer_matches_baseline(widths, act, loss, exact_strategy):
    model = mlp(widths, act, seed=len(widths))
    x, y = data(40, widths[0], widths[-1], loss, seed=1)
    for name in linear_names(model):
        fast = rf.relative_flatness(model, name, x, y, loss=loss, lmax=True, block_trace=True)
        base = rf.relative_flatness_autograd(model, name, x, y, loss=loss, lmax=True, vectorize=True)
        assert fast.method == ("closed_form" if name == linear_names(model)[-1] else "exact")
        assert fast.method == "closed_form" or exact_strategy in fast.reason
        _close(fast.kappa, base.kappa)
        _close(fast.kappa_lmax, base.kappa_lmax)
        torch.testing.assert_close(fast.block_trace, base.block_trace, rtol=1e-8, atol=1e-12 * base.block_trace.abs().max())
        assert fast.n == base.n == 40


def test_exact_path_on_last_layer_matches_closed_form(exact_strategy):
    model = mlp([5, 6, 4], "tanh", seed=3)
    x, y = data(30, 5, 4, "cross_entropy")
    closed = rf.relative_flatness(model, "2", x, y, method="closed_form", lmax=True, block_trace=True)
    exact = rf.relative_flatness(model, "2", x, y, method="exact", lmax=True, block_trace=True)
    _close(exact.kappa, closed.kappa, 1e-10)
    _close(exact.kappa_lmax, closed.kappa_lmax, 1e-10)


def test_callable_loss_matches_baseline(exact_strategy):
    def smooth_l1(out, target):  # any mean-over-samples loss
        return F.smooth_l1_loss(out, target) + 0.1 * out.pow(4).mean()

    model = mlp([4, 6, 5, 3], "softplus", seed=5)
    x, y = data(25, 4, 3, "mse", seed=2)
    for name in linear_names(model):
        fast = rf.relative_flatness(model, name, x, y, loss=smooth_l1, block_trace=True)
        base = rf.relative_flatness_autograd(model, name, x, y, loss=smooth_l1, vectorize=True)
        assert fast.method == "exact" and exact_strategy in fast.reason
        _close(fast.kappa, base.kappa)


def test_weight_probes_when_outputs_outnumber_features():
    """m < d: kappa from m probes along W's columns when neither block_trace nor lmax is asked."""
    model = mlp([6, 3, 9, 4], "tanh", seed=7)  # layer "2": 3 -> 9
    x, y = data(20, 6, 4, "cross_entropy")
    with _tail.hvp_only():  # the HVP path's choice of probes
        quick = rf.relative_flatness(model, "2", x, y, block_trace=False)
    base = rf.relative_flatness_autograd(model, "2", x, y, vectorize=True)
    assert quick.block_trace is None
    _close(quick.kappa, base.kappa)


def test_authors_loop_equals_vectorized_baseline():
    model = mlp([4, 5, 3], "tanh", seed=2)
    x, y = data(15, 4, 3, "cross_entropy")
    loop = rf.layer_hessian(model, "0", x, y)[0]
    vec = rf.layer_hessian(model, "0", x, y, vectorize=True)[0]
    torch.testing.assert_close(loop, vec)
    torch.testing.assert_close(loop, loop.T)  # a Hessian


def test_from_features_matches_model_level_call():
    model = mlp([5, 6, 4], "tanh", seed=4)
    x, y = data(30, 5, 4, "cross_entropy")
    feats = model[1](model[0](x)).detach()
    a = rf.relative_flatness_from_features(feats, model[2].weight.detach(), y, bias=model[2].bias.detach(), lmax=True)
    b = rf.relative_flatness(model, "2", x, y, lmax=True, block_trace=True)
    _close(a.kappa, b.kappa, 1e-12)
    _close(a.kappa_lmax, b.kappa_lmax, 1e-12)


def test_probability_targets_for_cross_entropy():
    model = mlp([5, 4], "tanh", seed=1)
    x, y = data(12, 5, 4, "cross_entropy")
    probs = F.one_hot(y, 4).double()
    _close(rf.relative_flatness(model, "0", x, probs).kappa, rf.relative_flatness(model, "0", x, y).kappa, 1e-14)


def test_float32_model_agrees_with_float64():
    model = mlp([6, 8, 5], "tanh", seed=8)
    x, y = data(50, 6, 5, "cross_entropy")
    k64 = [rf.relative_flatness(model, n, x, y).kappa for n in ("0", "2")]
    model32 = model.float()
    k32 = [rf.relative_flatness(model32, n, x.float(), y).kappa for n in ("0", "2")]
    for a, b in zip(k32, k64):
        _close(a, b, 1e-4)


@pytest.mark.parametrize("widths, layer, method", [([150, 300], "0", "closed_form"), ([150, 300, 3], "0", "exact")])
def test_auto_computes_exactly_where_no_hvps_are_needed(widths, layer, method):
    """A wide layer (d > max_probes) whose exact path is the closed form or the chain rule: "auto"
    computes it exactly (before: a stochastic estimate, with a reason claiming it was cheaper)."""
    model = mlp(widths, "tanh", seed=3)
    x, y = data(40, widths[0], widths[-1], "cross_entropy")
    res = rf.relative_flatness(model, layer, x, y, max_probes=100)
    assert res.method == method and res.kappa_stderr is None, res.reason
    base = rf.relative_flatness(model, layer, x, y, method="exact")
    _close(res.kappa, base.kappa, 1e-12)


class _RoutedExperts(nn.Module):
    """Mixture of experts: each sample goes through one expert, chosen by its features, so an
    expert's input has fewer rows than the batch."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.experts = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        route = h[:, 0] > 0
        out = torch.zeros_like(h).index_put((route.nonzero()[:, 0],), self.experts[0](h[route]))
        out = out.index_put(((~route).nonzero()[:, 0],), self.experts[1](h[~route]))
        return self.head(torch.tanh(out))


def test_routed_experts_are_measured_exactly_over_the_samples_they_see():
    """Before: the profile crashed computing the normalized kappa (a mask of the batch's length on
    the expert's fewer rows); representativeness failed with a shape error from the KDE."""
    torch.manual_seed(0)
    model = _RoutedExperts().double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 4, (40,))
    rows = {r["layer"]: r for r in rf.profile(model, x, y, progress=False).rows}
    for name in ("experts.0", "experts.1"):
        assert rows[name]["method"] == "exact"
        assert rows[name]["kappa"] == pytest.approx(rf.relative_flatness_autograd(model, name, x, y).kappa, rel=1e-10)
        normalized = rf.relative_flatness_autograd(model, name, x, y, normalize_features=True).kappa
        assert rows[name]["kappa_normalized"] == pytest.approx(normalized, rel=1e-10)
        assert rf.relative_flatness(model, name, x, y, normalize_features=True).kappa == pytest.approx(normalized,
                                                                                                      rel=1e-10)
        with pytest.raises(ValueError, match="one feature vector per sample"):
            rf.representativeness(model, name, x, y)


def test_a_layer_fed_several_rows_per_sample_is_not_measured_as_if_rows_were_samples():
    """A model that flattens its tokens into rows before a Linear layer, with one target per
    sequence: the per-sample identity misses the cross-row terms. Before: the exact path gave
    0.191 against the full Hessian's 0.0105, without a word. Now it refuses, ``auto`` estimates,
    and feature robustness keeps one matrix per copy for all of a sample's rows."""
    class Flattened(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            n, t, m = x.shape
            return self.head(torch.tanh(self.proj(x.reshape(-1, m))).reshape(n, t, -1).mean(1))

    torch.manual_seed(0)
    model = Flattened().double()
    x, y = torch.randn(50, 5, 4, dtype=torch.float64), torch.randint(0, 3, (50,))
    exact = rf.relative_flatness_autograd(model, "proj", x, y).kappa
    with pytest.raises(ValueError, match="250 feature vectors for 50 samples"):
        rf.relative_flatness(model, "proj", x, y, method="exact")
    auto = rf.relative_flatness(model, "proj", x, y, seed=0, rel_tol=0.03)
    assert auto.method == "stochastic" and abs(auto.kappa - exact) <= 4 * auto.kappa_stderr
    fr = rf.feature_robustness(model, "proj", x, y, delta=1e-2, seed=0, n_samples=128, kappa=exact)
    scale = 1e-4 / (2 * 4)
    assert abs(fr.value / scale - exact) <= 4 * fr.stderr / scale


def test_results_print_as_one_readable_line():
    """What a notebook shows: the value with its error and how it was obtained, on one line; the
    per-sample tensors only by shape (before: every draw and fold printed in full)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    exact = rf.relative_flatness(model, "0", x, y, lmax=True, block_trace=True)
    estimated = rf.relative_flatness(model, "0", x, y, method="stochastic", max_probes=64, seed=0)
    robustness = rf.feature_robustness(model, "0", x, y, delta=0.01, seed=0)
    rep = rf.representativeness(model, "0", x, y, seed=0)
    bound = rf.generalization_bound(model, "0", x, y, seed=0)
    for result, pieces in (
            (exact, [f"kappa={exact.kappa:.6g} [exact]", f"kappa_lmax={exact.kappa_lmax:.6g}",
                     "block_trace=<tensor (16, 16)>", "reason='exact:"]),
            (estimated, [f"kappa={estimated.kappa:.6g} +- {estimated.kappa_stderr:.2g} [stochastic, 64 probes]"]),
            (robustness, [f"value={robustness.value:.6g} +- {robustness.stderr:.2g}",
                          f"predicted={robustness.predicted:.6g}", "draws=64 orthogonal antithetic"]),
            (rep, [f"value={rep.value:.6g} +- {rep.stderr:.2g}", "10 folds x 1"]),
            (bound, [f"bound={bound.bound:.6g} = representativeness", f"empirical_risk={bound.empirical_risk:.6g}"])):
        text = repr(result)
        assert "\n" not in text and "tensor([" not in text and len(text) < 400, text
        assert all(p in text for p in pieces), (text, pieces)
