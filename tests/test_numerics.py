"""float32 at confident minima: every exact path keeps its digits when p_k or sigma(z) round to 1.

Before the cancellation-free forms, kappa lost every digit from logit margins of about 20 (errors
up to 2e8 at margin 40, see bench/results/confident-before.json); measured after: at most 2e-6
relative error on every path, loss, margin and kernel branch (bench/results/confident.json).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import relflat_ext as rf
from relflat_ext import fallback_only
from relflat_ext.core.losses import LOSSES
from relflat_ext.ops.stable_math import softmax_complement
from relflat_ext.core.hvp import hessian_vector_products
from relflat_ext import hvp_only
from models import behind_a_layer, confident_head

TOL = 1e-5
MARGINS = [0, 10, 20, 30, 40]
# Every kernel branch: d <= 32 (register-blocked), 32 < d <= 64 (inline), d > 64 with m >= d
# (the P D GEMM) and with m < d (the argmax-centred GEMM).
SHAPES = [(10, 64), (40, 64), (100, 128), (100, 32)]


def _rel(got, ref):
    got, ref = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    assert bool(torch.isfinite(got).all()), f"non-finite result {got}"
    scale = ref.abs().max()
    if scale < 1e-30:  # the target's own fallback: float32 may return 0, never NaN
        return 0.0 if got.abs().max() < 1e-30 else float("inf")
    return float((got - ref).abs().max() / scale)


def _measure(path, x, w, b, y, loss, dtype):
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    y = y.to(dtype) if y.is_floating_point() else y
    if path in ("kernel", "fallback"):
        with fallback_only() if path == "fallback" else contextlib.nullcontext():
            return rf.relative_flatness_from_features(x, w, y, loss=loss, bias=b, lmax=True, block_trace=True)
    if path == "model_level":  # the drop-in call on a head that ends a Sequential: the closed form
        head = torch.nn.Linear(w.shape[1], w.shape[0]).to(dtype)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        res = rf.relative_flatness(torch.nn.Sequential(head), "0", x, y, loss=loss, lmax=True, block_trace=True)
        assert res.method == "closed_form"
        return res
    model = behind_a_layer(w.double(), b.double()).to(dtype)
    with hvp_only() if path == "hvp" else contextlib.nullcontext():
        return rf.relative_flatness(model, "0", x, y, loss=loss, method="exact", lmax=True, block_trace=True)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce_with_logits"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["kernel", "fallback", "model_level", "chain_rule", "hvp"])
def test_float32_keeps_its_digits_at_every_margin(loss, shape, path):
    d, m = shape
    if path in ("chain_rule", "hvp") and m > 64:
        pytest.skip("the model puts an m x m layer before the head: the small shapes cover these paths")
    for margin in MARGINS:
        x, w, b, y = confident_head(d, m, loss, margin, n=64)
        ref = _measure(path, x, w, b, y, loss, torch.float64)
        got = _measure(path, x, w, b, y, loss, torch.float32)
        if path == "chain_rule":
            assert "chain rule" in got.reason
        for key in ("kappa", "kappa_lmax", "block_trace"):
            err = _rel(getattr(got, key), getattr(ref, key))
            assert err <= TOL, f"{key} at margin {margin}: relative error {err:.2e}"


@pytest.mark.parametrize("margin", [0.0, 30.0])
def test_derivative_losses_equal_autograd_and_stay_accurate(margin):
    """Loss.for_derivatives: the same gradient and Hessian-vector products as F.* in float64, and
    float32 agreeing with float64 at a margin where F.*'s float32 derivatives have no digit left."""
    g = torch.Generator().manual_seed(0)
    z64 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    z64[:, 2] += margin
    z64 = z64.float().double()  # float32 inputs exactly: the comparison then sees only the arithmetic
    targets = {"cross_entropy": [torch.full((6,), 2), torch.softmax(torch.randn(6, 5, generator=g,
                                                                                  dtype=torch.float64), 1)],
               "bce_with_logits": [torch.ones(6, 5, dtype=torch.float64), torch.rand(6, 5, generator=g,
                                                                                    dtype=torch.float64)]}
    plain = {"cross_entropy": F.cross_entropy, "bce_with_logits": F.binary_cross_entropy_with_logits}
    probes = torch.randn(3, 6, 5, generator=g, dtype=torch.float64).float().double()
    for name, ys in targets.items():
        for y in ys:
            results = {}
            for label, fn, dtype in (("plain64", plain[name], torch.float64),
                                     ("stable64", LOSSES[name].for_derivatives, torch.float64),
                                     ("stable32", LOSSES[name].for_derivatives, torch.float32)):
                z = z64.to(dtype).requires_grad_(True)
                yy = y.to(dtype) if y.is_floating_point() else y
                grad = torch.autograd.grad(fn(z, yy), z, create_graph=True)[0]
                results[label] = (grad.detach(), hessian_vector_products(grad, z, probes.to(dtype)))
            for k in range(2):  # at margin 30, F.*'s float64 p_k - 1 keeps 2 digits: atol covers it
                torch.testing.assert_close(results["stable64"][k], results["plain64"][k], rtol=1e-12, atol=1e-15)
                assert _rel(results["stable32"][k], results["stable64"][k]) < TOL


def test_softmax_complement_is_accurate_where_one_minus_p_is_not():
    z = torch.tensor([[20.0, 0.0, -1.0], [0.0, 0.5, 0.2]], dtype=torch.float32)
    p = torch.softmax(z, 1)
    exact = 1 - torch.softmax(z.double(), 1)  # float64 keeps 1 - p_k = 2.8e-9 to 1e-7
    assert (1 - p)[0, 0] == 0  # what the naive form gives in float32
    assert _rel(softmax_complement(p), exact) < 1e-6
    torch.testing.assert_close(softmax_complement(p)[0, 0].double(), exact[0, 0], rtol=1e-6, atol=0)


def test_stochastic_estimator_is_unbiased_at_a_confident_minimum():
    """Its Hessian-vector products go through the same stable loss: in float32 at margin 30 the
    estimate agrees with the exact float64 kappa (before: the HVPs were rounding noise)."""
    x, w, b, y = confident_head(10, 16, "cross_entropy", 30.0, n=64)
    model = behind_a_layer(w, b)
    exact = rf.relative_flatness(model, "2", x, y, method="exact").kappa
    est = rf.relative_flatness(model.float(), "2", x.float(), y, method="stochastic", rel_tol=0.02, seed=0)
    assert abs(est.kappa - exact) <= 4 * est.kappa_stderr + 1e-5 * exact, (est.kappa, est.kappa_stderr, exact)
