"""Derivatives of the ops: every kernel's backward == autograd through the pure-PyTorch
specification (float64), gradcheck and opcheck on every differentiable op, and backward at
confident minima in float32 (the regime where naive formulas lose every digit)."""
import contextlib
import itertools

import pytest
import torch

from relflat_ext import ops
from relflat_ext.ops import reference as ref
from relflat_ext.ops._extension import HAS_EXTENSION, fallback_only
from testing import DEVICES

LOSSES = ["cross_entropy", "mse", "bce_with_logits"]
OUTPUTS = [(False, True), (True, True), (True, False)]  # (block_trace, per_sample)
# d <= 32 (padded to 8, 16 and 32 outputs, m below, at and beyond one vector of columns), d = 1,
# wide head, m < d
SHAPES = [(7, 5, 4), (9, 16, 9), (13, 37, 17), (1, 3, 1), (30, 70, 120), (20, 9, 40)]
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="compiled extension not built")


def _inputs(n, m, d, device, seed, bias=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, m, generator=g, dtype=torch.float64)
    w = torch.randn(d, m, generator=g, dtype=torch.float64) / m ** 0.5
    b = torch.randn(d, generator=g, dtype=torch.float64) if bias else None
    return [None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True) for t in (f, w, b)]


def _weighted_output(op, f, w, b, loss, block_trace, per_sample, seed=0):
    """A random linear functional of both outputs, so both upstream gradients are exercised."""
    per, block = op(f, w, b, loss, block_trace, per_sample)
    g = torch.Generator().manual_seed(seed)
    weights = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)  # noqa: E731 (same in any dtype)
    total = (per * weights(per)).sum()
    if block.numel():
        total = total + (block * weights(block)).sum()
    return total


def _grads(total, inputs):
    return torch.autograd.grad(total, [t for t in inputs if t is not None], allow_unused=True, materialize_grads=True)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss, outputs, shape, bias", list(itertools.product(LOSSES, OUTPUTS, SHAPES, [True, False])))
def test_backward_kernel_equals_autograd_through_the_specification(device, loss, outputs, shape, bias):
    f, w, b = _inputs(*shape, device, seed=sum(shape), bias=bias)
    got = _grads(_weighted_output(torch.ops.relflat.last_layer_flatness, f, w, b, loss, *outputs), (f, w, b))
    want = _grads(_weighted_output(ref.last_layer_flatness, f, w, b, loss, *outputs), (f, w, b))
    for name, a, c in zip(("features", "weight", "bias"), got, want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12 * max(1.0, c.abs().max().item()), msg=name)


@needs_extension
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("used", ["per_sample", "block"])
@pytest.mark.parametrize("shape", [(9, 16, 9), (30, 70, 120)])
def test_gradients_with_one_of_two_outputs_used(loss, used, shape):
    """Both outputs computed, one used: the C++ backward gets an undefined gradient for the other
    (it does not materialize zeros, so that the fused per-sample pass stays available; this test
    checks the values, not that choice), and the gradients equal autograd through the
    specification."""
    f, w, b = _inputs(*shape, "cpu", seed=3)
    pick = 0 if used == "per_sample" else 1
    got = _grads(torch.ops.relflat.last_layer_flatness(f, w, b, loss, True, True)[pick].square().sum(), (f, w, b))
    want = _grads(ref.last_layer_flatness(f, w, b, loss, True, True)[pick].square().sum(), (f, w, b))
    for name, a, c in zip(("features", "weight", "bias"), got, want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12 * max(1.0, c.abs().max().item()), msg=name)


@pytest.mark.parametrize("fallback", [False, True] if HAS_EXTENSION else [True])
@pytest.mark.parametrize("loss, outputs", list(itertools.product(LOSSES, OUTPUTS)))
def test_gradcheck_last_layer_flatness(fallback, loss, outputs):
    f, w, b = _inputs(6, 4, 3, "cpu", seed=1)
    def call(f, w, b):
        with (fallback_only() if fallback else contextlib.nullcontext()):
            return ops.last_layer_flatness(f, w, b, loss, *outputs)
    assert torch.autograd.gradcheck(call, (f, w, b))


@pytest.mark.parametrize("fallback", [False, True] if HAS_EXTENSION else [True])
@pytest.mark.parametrize("block_trace", [False, True])
def test_gradcheck_contract_output_hessians(fallback, block_trace):
    g = torch.Generator().manual_seed(2)
    sq = torch.rand(6, generator=g, dtype=torch.float64).requires_grad_(True)
    hz = torch.randn(6, 3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    gram = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    def call(*args):
        with (fallback_only() if fallback else contextlib.nullcontext()):
            return ops.contract_output_hessians(*args, block_trace)
    assert torch.autograd.gradcheck(call, (sq, hz, gram))


@pytest.mark.parametrize("fallback", [False, True] if HAS_EXTENSION else [True])
def test_gradcheck_dense_block_trace(fallback):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    h = torch.randn(12, 12, generator=g, dtype=torch.float64).requires_grad_(True)
    def call(*args):
        with (fallback_only() if fallback else contextlib.nullcontext()):
            return ops.dense_block_trace(*args)
    assert torch.autograd.gradcheck(call, (h, w))


@needs_extension
@pytest.mark.parametrize("loss", LOSSES)
def test_opcheck_with_gradients(loss):
    f, w, b = _inputs(7, 5, 4, "cpu", seed=4)
    for args in ((f, w, b, loss, True, True), (f, w, None, loss, False, True), (f, w, b, loss, False, False)):
        torch.library.opcheck(torch.ops.relflat.last_layer_flatness.default, args)
    grads = (torch.randn(7, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64))
    for given in (grads, (grads[0], torch.empty(0, 0, dtype=torch.float64)),
                  (torch.empty(0, dtype=torch.float64), grads[1])):
        torch.library.opcheck(torch.ops.relflat.last_layer_flatness_backward.default,
                              (*given, f.detach(), w.detach(), b.detach(), loss))


@needs_extension
def test_opcheck_contract_and_dense_with_gradients():
    g = torch.Generator().manual_seed(5)
    sq = torch.rand(6, generator=g, dtype=torch.float64).requires_grad_(True)
    hz = torch.randn(6, 3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    gram = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    torch.library.opcheck(torch.ops.relflat.contract_output_hessians.default, (sq, hz, gram, True))
    torch.library.opcheck(torch.ops.relflat.contract_output_hessians.default, (sq, hz, gram, False))
    w = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    h = torch.randn(12, 12, generator=g, dtype=torch.float64).requires_grad_(True)
    torch.library.opcheck(torch.ops.relflat.dense_block_trace.default, (h, w))


@needs_extension
def test_second_derivatives_are_a_clear_error():
    f, w, b = _inputs(5, 4, 3, "cpu", seed=6)
    per, _ = ops.last_layer_flatness(f, w, b, "cross_entropy", False)
    grad_f, = torch.autograd.grad(per.sum(), f, create_graph=True)
    with pytest.raises(RuntimeError, match="last_layer_flatness_backward is not differentiable"):
        grad_f.sum().backward()


def _confident(margin, loss):
    """Features that a weight maps exactly onto one-hot logits (n < m), scaled to the margin."""
    g = torch.Generator().manual_seed(7)
    n, m, d = 32, 40, 10
    f = torch.randn(n, m, generator=g, dtype=torch.float64)
    noise = torch.randn(d, m, generator=g, dtype=torch.float64)
    y = torch.randint(0, d, (n,), generator=g)
    direction = torch.linalg.lstsq(f, torch.nn.functional.one_hot(y, d).double()).solution.T  # (d, m)
    w = noise * 1e-3 + direction * margin
    b = -margin / 2 * torch.ones(d, dtype=torch.float64) if loss == "bce_with_logits" else None
    return f, w, b


def _naive_cross_entropy(f, w, b, loss, block_trace, per_sample):
    """sum_s p_s G_ss - p^T G p: the textbook form, for the test to show what it guards against."""
    p, gram = torch.softmax(f @ w.T, 1), w @ w.T
    return f.pow(2).sum(1) * ((p * gram.diagonal()).sum(1) - ((p @ gram) * p).sum(1)), f.new_empty(0, 0)


def _relative_errors(op, f, w, b, loss, device):
    f64, w64 = f.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = _grads(_weighted_output(ref.last_layer_flatness, f64, w64, b, loss, False, True), (f64, w64))
    f32, w32 = f.float().to(device).requires_grad_(True), w.float().to(device).requires_grad_(True)
    b32 = None if b is None else b.float().to(device)
    got = _grads(_weighted_output(op, f32, w32, b32, loss, False, True), (f32, w32))
    return [float((a.double().cpu() - c).abs().max() / c.abs().max()) for a, c in zip(got, want)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["cross_entropy", "bce_with_logits"])
@pytest.mark.parametrize("margin", [12.0, 30.0])
def test_float32_gradients_keep_their_digits_at_confident_minima(device, loss, margin):
    """Every sample at a logit margin of 12 or 30 (1 - p rounds to 0 in float32 from about 17 on):
    the float32 gradients agree with the float64 specification to 1e-4 relative, because no formula
    subtracts from 1 or from p_k. The textbook form, differentiated by autograd, is off by 0.1%
    at margin 12 and by 100x at margin 30 (checked here too, so this test can tell them apart)."""
    f, w, b = _confident(margin, loss)
    assert max(_relative_errors(ops.last_layer_flatness, f, w, b, loss, device)) < 1e-4
    if loss == "cross_entropy" and margin == 30.0:
        assert max(_relative_errors(_naive_cross_entropy, f, w, b, loss, device)) > 1.0
