"""Every kernel == its pure-PyTorch fallback (the specification), on every device built."""
import contextlib
import itertools

import pytest
import torch

import relflat_ext as rf
from relflat_ext.ops import reference as ref
from relflat_ext import ops
from relflat_ext.ops._extension import HAS_EXTENSION, fallback_only, runs_on
from testing import DEVICES, DTYPES, assert_matches_reference

SHAPES = [(1, 1, 1), (1, 5, 3), (7, 1, 4), (40, 13, 1), (64, 17, 10), (33, 9, 32), (50, 20, 33), (30, 70, 120),
          (20, 130, 100), (4200, 9, 12), (4200, 9, 20), (60, 500, 450)]  # every branch: d <= 32 (batches up
# to 4096 rows and above; above, cross entropy with d < 16 or not), d <= 64, d > 64 with m < d and with m >= d;
# d > 192: the block's symmetric product by halves
LOSSES = ["cross_entropy", "mse", "bce_with_logits"]
CE = "cross_entropy"


def _inputs(n, m, d, dtype, device, seed, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, m, generator=g, dtype=torch.float64)
    w = torch.randn(d, m, generator=g, dtype=torch.float64) / m ** 0.5
    b = torch.randn(d, generator=g, dtype=torch.float64)
    if noncontig:  # same values, transposed storage
        f = f.T.contiguous().T
        w = w.T.contiguous().T
    return [t.to(device=device, dtype=dtype) for t in (f, w, b)]


def test_build_info_reports_what_was_built():
    info = rf.build_info()
    assert info["version"] == rf.__version__
    assert info["compiled"] == HAS_EXTENSION
    if HAS_EXTENSION:
        assert info["torch_version"] == torch.__version__.split("+")[0]
        assert isinstance(info["cuda_arch_list"], list)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontig", [False, True])
def test_last_layer_flatness_matches_fallback(device, dtype, loss, shape, noncontig):
    n, m, d = shape
    f, w, b = _inputs(n, m, d, dtype, device, seed=n * 1000 + m * 10 + d, noncontig=noncontig)
    for bias in (b, None):
        got = ops.last_layer_flatness(f, w, bias, loss, True)
        same = ref.last_layer_flatness(f.cpu(), w.cpu(), None if bias is None else bias.cpu(), loss, True)
        f64 = ref.last_layer_flatness(f.cpu().double(), w.cpu().double(),
                                      None if bias is None else bias.cpu().double(), loss, True)
        assert_matches_reference(got[0], same[0], f64[0], f"per_sample {shape} loss {loss}")
        assert_matches_reference(got[1], same[1], f64[1], f"block {shape} loss {loss}")
        no_block = ops.last_layer_flatness(f, w, bias, loss, False)
        assert no_block[1].shape == (0, 0)
        torch.testing.assert_close(no_block[0], got[0], rtol=0, atol=0)
        sum_only = ops.last_layer_flatness(f, w, bias, loss, False, per_sample=False)  # kappa = <G, block>
        assert sum_only[0].shape == (0,)
        assert_matches_reference(sum_only[1], same[1], f64[1], f"block alone {shape} loss {loss}")
        assert_matches_reference((w @ w.T * sum_only[1]).sum(), same[0].sum(), f64[0].sum(),
                                 f"kappa from the block {shape} loss {loss}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 3), (17, 10, 4), (9, 32, 70), (3, 1, 12)])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "strided"])
def test_contract_output_hessians_matches_fallback(device, dtype, shape, layout):
    n, d, k = shape
    g = torch.Generator().manual_seed(n + 31 * d + 7 * k)
    hz = torch.randn(n, d, k, generator=g, dtype=torch.float64)
    if layout == "permuted":  # the exact path's layout: (k, n, d) storage seen as (n, d, k)
        hz = hz.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    elif layout == "strided":
        hz = torch.randn(n, 2 * d, k, generator=g, dtype=torch.float64)[:, ::2]
    sq = torch.rand(n, generator=g, dtype=torch.float64)
    gram = torch.randn(d, k, generator=g, dtype=torch.float64)
    args = [t.to(device=device, dtype=dtype) for t in (sq, hz, gram)]
    got = ops.contract_output_hessians(*args, True)
    same = ref.contract_output_hessians(*[a.cpu() for a in args], True)
    f64 = ref.contract_output_hessians(sq, hz, gram, True)
    assert_matches_reference(got[0], same[0], f64[0], "per_sample")
    assert_matches_reference(got[1], same[1], f64[1], "block")
    assert ops.contract_output_hessians(*args, False)[1].shape == (0, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (4, 1), (3, 5), (10, 12)])
@pytest.mark.parametrize("transposed", [False, True])
def test_dense_block_trace_matches_fallback(device, dtype, shape, transposed):
    d, m = shape
    g = torch.Generator().manual_seed(d * 100 + m)
    h = torch.randn(d * m, d * m, generator=g, dtype=torch.float64)
    h = h.T if transposed else h
    w = torch.randn(d, m, generator=g, dtype=torch.float64)
    got = ops.dense_block_trace(h.to(device, dtype), w.to(device, dtype))
    same = ref.dense_block_trace(h.to(dtype), w.to(dtype))
    f64 = ref.dense_block_trace(h, w)
    assert_matches_reference(got[0], same[0], f64[0], "kappa")
    assert_matches_reference(got[1], same[1], f64[1], "block_trace")
    # independent definition: T[s, t] = sum_j H[s*m + j, t*m + j]
    naive = torch.tensor([[sum(h[s * m + j, t * m + j] for j in range(m)) for t in range(d)] for s in range(d)],
                         dtype=torch.float64)
    torch.testing.assert_close(f64[1], naive)


def test_cross_entropy_closed_form_matches_explicit_hessians():
    """The fallback itself against Hz = diag(p) - p p^T built entry by entry."""
    f, w, b = _inputs(6, 5, 4, torch.float64, "cpu", seed=3)
    per_sample, block = ref.last_layer_flatness(f, w, b, "cross_entropy", True)
    p = torch.softmax(f @ w.T + b, 1)
    gram = w @ w.T
    for i in range(6):
        hz = torch.diag(p[i]) - torch.outer(p[i], p[i])
        torch.testing.assert_close(per_sample[i], f[i].pow(2).sum() * (gram * hz).sum())
    hz_all = torch.stack([torch.diag(p[i]) - torch.outer(p[i], p[i]) for i in range(6)])
    torch.testing.assert_close(block, torch.einsum("n,nst->st", f.pow(2).sum(1), hz_all))


@pytest.mark.skipif(not HAS_EXTENSION, reason="compiled extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    f, w, b = _inputs(12, 7, 5, torch.float64, device, seed=1)
    for loss, block in itertools.product(LOSSES, (True, False)):
        torch.library.opcheck(torch.ops.relflat.last_layer_flatness.default, (f, w, b, loss, block))
    torch.library.opcheck(torch.ops.relflat.last_layer_flatness.default, (f, w, None, "cross_entropy", True))
    torch.library.opcheck(torch.ops.relflat.last_layer_flatness.default, (f, w, b, "cross_entropy", False, False))
    hz = torch.randn(12, 5, 3, dtype=torch.float64, device=device)
    sq = torch.rand(12, dtype=torch.float64, device=device)
    gram = torch.randn(5, 3, dtype=torch.float64, device=device)
    for block in (True, False):
        torch.library.opcheck(torch.ops.relflat.contract_output_hessians.default, (sq, hz, gram, block))
    h = torch.randn(35, 35, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.relflat.dense_block_trace.default, (h, w))


@pytest.mark.parametrize("call, match", [
    (lambda: ops.last_layer_flatness(torch.randn(3, 4), torch.randn(2, 5), None, CE), "weight must be"),
    (lambda: ops.last_layer_flatness(torch.randn(3, 4), torch.randn(0, 4), None, CE), "d >= 1"),
    (lambda: ops.last_layer_flatness(torch.randn(3), torch.randn(2, 3), None, CE), "features must be 2-D"),
    (lambda: ops.last_layer_flatness(torch.randn(3, 4), torch.randn(2, 4, dtype=torch.float64), None, CE), "dtype"),
    (lambda: ops.last_layer_flatness(torch.randn(3, 4).int(), torch.randn(2, 4), None, CE), "float32 or float64"),
    (lambda: ops.last_layer_flatness(torch.randn(3, 4), torch.randn(2, 4), torch.randn(3), CE), "bias must be"),
    (lambda: ops.last_layer_flatness(torch.randn(3, 4), torch.randn(2, 4), None, "hinge"), "loss must be one of"),
    (lambda: ops.contract_output_hessians(torch.rand(3), torch.randn(3, 2, 2), torch.randn(2, 3)), "hz must be"),
    (lambda: ops.dense_block_trace(torch.randn(6, 5), torch.randn(2, 3)), "hessian must be"),
])
def test_ops_reject_bad_arguments(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


@pytest.mark.skipif(not HAS_EXTENSION, reason="compiled extension not built")
def test_kernels_check_arguments_when_called_directly():
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.relflat.last_layer_flatness(torch.randn(3, 4), torch.randn(2, 5), None, "cross_entropy", False)
    for n, per_sample in itertools.product((10, 5000), (True, False)):  # no outputs: an error, not a crash
        with pytest.raises(RuntimeError, match="d >= 1"):
            torch.ops.relflat.last_layer_flatness(torch.randn(n, 3), torch.randn(0, 3), None, "cross_entropy", True,
                                                  per_sample)
    with pytest.raises(RuntimeError, match="d >= 1"):
        torch.ops.relflat.last_layer_flatness_backward(torch.ones(4), torch.empty(0, 0), torch.randn(4, 3),
                                                       torch.randn(0, 3), None, "cross_entropy")
    with pytest.raises(RuntimeError, match="hessian must be"):
        torch.ops.relflat.dense_block_trace(torch.randn(6, 5), torch.randn(2, 3))


def test_fallback_only_switches_every_op_to_the_reference():
    from relflat_ext.ops import fallback_only, kernel_available
    cpu = torch.device("cpu")
    available = kernel_available(cpu)
    with fallback_only():
        assert not kernel_available(cpu)
        f, w, b = _inputs(20, 5, 3, torch.float64, "cpu", 0)
        got = ops.last_layer_flatness(f, w, b, "cross_entropy", True)
    assert kernel_available(cpu) == available
    want = ref.last_layer_flatness(f, w, b, "cross_entropy", True)
    assert all(torch.equal(a, c) for a, c in zip(got, want))


def _op_calls(device):
    f, w, b = _inputs(9, 5, 3, torch.float64, device, seed=3)
    sq, hz, gram = f.pow(2).sum(1), torch.randn(9, 3, 3, dtype=torch.float64, device=device), w @ w.T
    h = torch.randn(15, 15, dtype=torch.float64, device=device)
    return {"last_layer_flatness": (lambda t: ops.last_layer_flatness(t, w, b, "cross_entropy", True), f),
            "contract_output_hessians": (lambda t: ops.contract_output_hessians(t, hz, gram, True), sq),
            "dense_block_trace": (lambda t: ops.dense_block_trace(h, t), w),
            "gaussian_kernel_reduce": (lambda t: ops.gaussian_kernel_reduce(t, f, sq[:, None],
                                                                            torch.ones(1, dtype=torch.float64,
                                                                                       device=device)), f)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("op", [op for op in ops.OPS if op not in ops.DIFFERENTIABLE_OPS])
def test_asking_an_op_for_a_gradient_is_a_clear_error(device, fallback, op):
    """The same on every backend for the op without a derivative (the KDE)."""
    call, tensor = _op_calls(device)[op]
    with fallback_only() if fallback else contextlib.nullcontext():
        outputs = call(tensor.clone().requires_grad_(True))
        with torch.no_grad():  # inputs that need no gradient: nothing to refuse
            call(tensor.clone().requires_grad_(True))
    with pytest.raises(ops.NoGradientError, match=f"{op} is not differentiable"):
        outputs[0].sum().backward()


@pytest.mark.parametrize("capability, arch_list, runs", [
    ((8, 0), ["8.0", "9.0+PTX"], True), ((8, 6), ["8.0", "9.0+PTX"], True),   # A100; RTX 30xx runs sm_80 code
    ((9, 0), ["8.0", "9.0+PTX"], True), ((10, 0), ["8.0", "9.0+PTX"], True),  # H100; Blackwell through PTX
    ((12, 0), ["8.0", "9.0+PTX"], True), ((7, 5), ["8.0", "9.0+PTX"], False),  # T4 has no kernel
    ((10, 0), ["8.0", "9.0"], False), ((9, 0), ["8.0"], False), ((8, 9), ["8.6"], True)])
def test_which_gpus_the_built_kernels_run_on(capability, arch_list, runs):
    assert runs_on(capability, arch_list) is runs
