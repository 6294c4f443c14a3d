"""Edge shapes for every op, on every device built: both sides of each kernel branch (d around 8,
16 and 32, m from 1 to 2048, n from 1 to 1025), against the float64 specification and, on a GPU,
against the CPU op; zero sizes against the fake kernels' shapes; and, on a GPU only, inputs made on
a side stream, 64-bit indexing (n * d above 2^31) and opcheck of every op. On a CPU-only machine
these run the CPU kernels through the same shapes; bench/gpu.sh runs them on the GPU."""
import itertools
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from relflat_ext import ops
from relflat_ext.ops import reference as ref
from relflat_ext.ops._extension import HAS_EXTENSION
from testing import DEVICES, assert_matches_reference

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="compiled extension not built")
GPU = [d for d in DEVICES if d != "cpu"]
EDGE_D, EDGE_M, EDGE_N = [8, 9, 16, 17, 32, 33], [1, 33, 2048], [1, 8, 9, 1025]
LOSSES = ["cross_entropy", "mse", "bce_with_logits"]


def _head(n, m, d, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, m, generator=g, dtype=torch.float64)
    w = torch.randn(d, m, generator=g, dtype=torch.float64) / math.sqrt(m)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (f, w, b)]


def _close_to_cpu_op(got, cpu, what):
    """A GPU result against the CPU op's: both are within the reference's tolerance of float64, so
    within twice that of each other (scale-relative: 1e-10 for float64, 1e-4 for float32)."""
    got, cpu = got.detach().double().cpu(), cpu.detach().double()
    if got.numel():
        scale = max(cpu.abs().max().item(), 1e-300)
        rel = 1e-10 if cpu.dtype == torch.float64 and got.dtype == torch.float64 else 1e-4
        assert (got - cpu).abs().max().item() <= rel * scale, what


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d, m, n", list(itertools.product(EDGE_D, EDGE_M, EDGE_N)))
def test_last_layer_flatness_at_branch_edges(device, d, m, n):
    for loss, dtype in itertools.product(LOSSES, [torch.float32, torch.float64]):
        f, w, b = _head(n, m, d, seed=n + 10 * m + 1000 * d, dtype=dtype, device=device)
        f64 = [t.cpu().double() for t in (f, w, b)]
        want64 = ref.last_layer_flatness(*f64, loss, True)
        want = ref.last_layer_flatness(f.cpu(), w.cpu(), b.cpu(), loss, True)
        for block_trace, per_sample in ((True, True), (False, True), (True, False)):
            got = ops.last_layer_flatness(f, w, b, loss, block_trace, per_sample)
            what = f"{loss} {dtype} n={n} m={m} d={d} block_trace={block_trace} per_sample={per_sample}"
            if per_sample:
                assert_matches_reference(got[0], want[0], want64[0], what + " per_sample")
            if block_trace or not per_sample:
                assert_matches_reference(got[1], want[1], want64[1], what + " block")
            if device != "cpu":
                cpu = torch.ops.relflat.last_layer_flatness(f.cpu(), w.cpu(), b.cpu(), loss, block_trace, per_sample)
                for a, c in zip(got, cpu):
                    _close_to_cpu_op(a, c, what + " against the CPU op")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d, m, n", [(8, 1, 1), (9, 33, 9), (17, 33, 1025), (32, 2048, 8), (33, 2048, 9),
                                     (33, 1, 1025)])
def test_backward_at_branch_edges(device, d, m, n):
    """The backward op (through autograd) against autograd through the specification, float64."""
    for loss in LOSSES:
        f, w, b = [t.requires_grad_(True) for t in _head(n, m, d, seed=7 * n + m + d, device=device)]
        g = torch.Generator().manual_seed(1)
        u = torch.randn(n, generator=g, dtype=torch.float64).to(device)
        v = torch.randn(d, d, generator=g, dtype=torch.float64).to(device)
        for block_trace in (False, True):
            def total(op):
                per, block = op(f, w, b, loss, block_trace, True)
                return (per * u).sum() + ((block * v).sum() if block_trace else 0)
            grad = lambda out: torch.autograd.grad(out, (f, w, b), allow_unused=True,  # noqa: E731 (MSE: no bias)
                                                   materialize_grads=True)
            got, want = grad(total(torch.ops.relflat.last_layer_flatness)), grad(total(ref.last_layer_flatness))
            for name, a, c in zip(("features", "weight", "bias"), got, want):
                torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11 * max(1.0, c.abs().max().item()),
                                           msg=f"{loss} n={n} m={m} d={d} block={block_trace}: {name}")


def _zero_size_calls(device):
    e = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
    bw = torch.ones(2, dtype=torch.float32, device=device)
    yield "last_layer_flatness n=0", torch.ops.relflat.last_layer_flatness, (e(0, 5), e(3, 5), e(3), "cross_entropy",
                                                                              True, True)
    yield "last_layer_flatness m=0", torch.ops.relflat.last_layer_flatness, (e(4, 0), e(3, 0), None, "bce_with_logits",
                                                                              True, True)
    yield "last_layer_flatness block only, n=0", torch.ops.relflat.last_layer_flatness, (
        e(0, 40), e(40, 40), None, "cross_entropy", True, False)
    yield "contract_output_hessians n=0", torch.ops.relflat.contract_output_hessians, (e(0), e(0, 3, 2), e(3, 2), True)
    yield "gaussian_kernel_reduce nq=0", torch.ops.relflat.gaussian_kernel_reduce, (
        e(0, 3), e(5, 3), e(5, 2), bw, None, None, None)
    yield "gaussian_kernel_reduce nk=0", torch.ops.relflat.gaussian_kernel_reduce, (
        e(4, 3), e(0, 3), None, bw, None, None, None)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_sizes_match_the_fake_kernels(device):
    for what, op, args in _zero_size_calls(device):
        got = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        for a, c in zip(got, fake):
            assert (tuple(a.shape), a.dtype, a.device) == (tuple(c.shape), c.dtype, c.device), what


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nq, nk, m", [(1, 1, 1), (3, 7, 33), (1025, 999, 85), (257, 31, 2)])
@pytest.mark.parametrize("bandwidth", [1e-4, 1.0, 1e4])
def test_kde_odd_sizes_and_extreme_bandwidths(device, nq, nk, m, bandwidth):
    g = torch.Generator().manual_seed(nq + nk + m)
    q, k = torch.randn(nq, m, generator=g, dtype=torch.float64), torch.randn(nk, m, generator=g, dtype=torch.float64)
    v = torch.randn(nk, 3, generator=g, dtype=torch.float64)
    bws = torch.tensor([bandwidth, 2 * bandwidth], dtype=torch.float64)
    want64 = ref.gaussian_kernel_reduce(q, k, v, bws, None, None, None)
    for dtype in (torch.float32, torch.float64):
        args = [t.to(device=device, dtype=dtype) for t in (q, k, v, bws)]
        got = torch.ops.relflat.gaussian_kernel_reduce(*args, None, None, None)
        want = ref.gaussian_kernel_reduce(*[a.cpu() for a in args], None, None, None)
        finite = torch.isfinite(want64[0])
        assert torch.equal(torch.isfinite(got[0].cpu()), finite), f"{dtype} bandwidth {bandwidth}: -inf pattern"
        assert_matches_reference(got[0].cpu()[finite], want[0][finite], want64[0][finite], f"logdens {dtype}")
        assert_matches_reference(got[1], want[1], want64[1], f"wval {dtype}")


def _hz_in_layout(n, d, k, layout, dtype=torch.float64, device="cpu"):
    """An (n, d, k) tensor of output-Hessian products laid out in memory as the name says (the
    buffer is made on the device and viewed there, so the layout is the kernel's input)."""
    g = torch.Generator().manual_seed(n + d + k)
    buffer = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    if layout == "n d k":
        return buffer(n, d, k)
    if layout == "k n d (the exact path's)":
        return buffer(k, n, d).permute(1, 2, 0)
    if layout == "n k d":
        return buffer(n, k, d).transpose(1, 2)
    if layout == "d k n (rows fastest)":
        return buffer(d, k, n).permute(2, 0, 1)
    assert layout == "every other column"
    return buffer(n, d, 2 * k)[:, :, ::2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["n d k", "k n d (the exact path's)", "n k d", "d k n (rows fastest)",
                                    "every other column"])
@pytest.mark.parametrize("n, d, k", [(1025, 10, 10), (3, 33, 65), (9, 1, 1), (40, 1000, 3)])
def test_contract_output_hessians_reads_every_layout(device, layout, n, d, k):
    """The strided reads (no copy of hz) and, with few long rows, the column splits."""
    g = torch.Generator().manual_seed(0)
    sq64, gram64 = torch.rand(n, generator=g, dtype=torch.float64), torch.randn(d, k, generator=g, dtype=torch.float64)
    want64 = ref.contract_output_hessians(sq64, _hz_in_layout(n, d, k, layout).contiguous(), gram64, True)
    for dtype in (torch.float32, torch.float64):
        args = (sq64.to(device, dtype), _hz_in_layout(n, d, k, layout, dtype, device), gram64.to(device, dtype))
        want = ref.contract_output_hessians(*[a.cpu() for a in args], True)
        got = torch.ops.relflat.contract_output_hessians(*args, True)
        for name, a, c, c64 in zip(("per_sample", "block"), got, want, want64):
            assert_matches_reference(a, c, c64, f"{layout} {dtype} n={n} d={d} k={k} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [0, 2])
def test_kde_across_query_blocks_key_slices_and_pair_groups(device, c):
    """More queries than one block takes, keys over many tiles (so the GPU slices them), and more
    (split, bandwidth) pairs than one block holds: every partial result merged."""
    g = torch.Generator().manual_seed(c)
    nq, nk, m = 300, 2000, 20
    q, k = torch.randn(nq, m, generator=g, dtype=torch.float64), torch.randn(nk, m, generator=g, dtype=torch.float64)
    v = torch.randn(nk, c, generator=g, dtype=torch.float64) if c else None
    bws = torch.logspace(-0.5, 1.0, 5, dtype=torch.float64) * math.sqrt(m)
    ids_q, ids_k = torch.randint(0, 5, (2, nq), generator=g), torch.randint(0, 5, (2, nk), generator=g)
    want64 = ref.gaussian_kernel_reduce(q, k, v, bws, None, ids_q, ids_k)
    for dtype in (torch.float32, torch.float64):
        args = [None if t is None else t.to(device=device, dtype=dtype) for t in (q, k, v, bws)]
        got = torch.ops.relflat.gaussian_kernel_reduce(*args, None, ids_q.to(device), ids_k.to(device))
        want = ref.gaussian_kernel_reduce(*[None if a is None else a.cpu() for a in args], None, ids_q, ids_k)
        for name, a, w, w64 in zip(("logdens", "wval"), got, want, want64):
            assert_matches_reference(a, w, w64, f"{dtype} c={c} {name}")


@pytest.mark.skipif(not GPU, reason="needs a GPU with the CUDA kernels")
def test_inputs_made_on_a_side_stream():
    """Kernels run on the current stream: inputs written on a side stream and the op called there
    give the default stream's result."""
    f, w, b = _head(1025, 33, 17, seed=3, dtype=torch.float32, device="cuda")
    want = [t.clone() for t in torch.ops.relflat.last_layer_flatness(f, w, b, "cross_entropy", True, True)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f2, w2, b2 = (t * 1.0 for t in (f, w, b))  # written by a kernel on the side stream
        got = torch.ops.relflat.last_layer_flatness(f2, w2, b2, "cross_entropy", True, True)
        kde = torch.ops.relflat.gaussian_kernel_reduce(f2, f2, None, torch.ones(2, device="cuda"), None, None, None)
    torch.cuda.current_stream().wait_stream(side)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    kde_default = torch.ops.relflat.gaussian_kernel_reduce(f, f, None, torch.ones(2, device="cuda"), None, None, None)
    torch.testing.assert_close(kde[0], kde_default[0], rtol=0, atol=0)


@pytest.mark.skipif(not GPU, reason="needs a GPU with the CUDA kernels")
def test_64bit_indexing_on_sampled_rows():
    """n * d above 2^31 (n = 2.2e6, d = 1000): sampled rows' per-sample terms against the float64
    specification, and the block sum against the sum of the op's own blocks over chunks below 2^31."""
    n, m, d = 2_200_000, 4, 1000
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    f, w, b = _head(n, m, d, seed=5, dtype=torch.float32, device="cuda")
    per, block = torch.ops.relflat.last_layer_flatness(f, w, b, "cross_entropy", True, True)
    rows = torch.randint(0, n, (512,), generator=torch.Generator().manual_seed(0))
    rows = torch.cat([rows, torch.tensor([0, n - 1])])
    sub = [t.cpu() for t in (f[rows.cuda()], w, b)]
    want64 = ref.last_layer_flatness(*[t.double() for t in sub], "cross_entropy", False)[0]
    want = ref.last_layer_flatness(*sub, "cross_entropy", False)[0]
    assert_matches_reference(per[rows.cuda()], want, want64, "sampled per-sample terms")
    chunks = sum(torch.ops.relflat.last_layer_flatness(c, w, b, "cross_entropy", True, False)[1].double()
                 for c in f.split(1_000_000))
    torch.testing.assert_close(block.double(), chunks, rtol=1e-4, atol=1e-4 * chunks.abs().max().item())
    del per, block


@pytest.mark.skipif(not GPU, reason="needs a GPU with the CUDA kernels")
def test_opcheck_every_op_on_the_gpu():
    f, w, b = [t.requires_grad_(True) for t in _head(9, 33, 17, seed=2, device="cuda")]
    for loss in LOSSES:
        torch.library.opcheck(torch.ops.relflat.last_layer_flatness.default, (f, w, b, loss, True, True))
    g = torch.randn(9, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.relflat.last_layer_flatness_backward.default,
                          (g, torch.empty(0, 0, dtype=torch.float64, device="cuda"), f.detach(), w.detach(), b.detach(),
                           "cross_entropy"))
    hz = torch.randn(9, 17, 17, dtype=torch.float64, device="cuda", requires_grad=True)
    sq = torch.rand(9, dtype=torch.float64, device="cuda", requires_grad=True)
    gram = torch.randn(17, 17, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.relflat.contract_output_hessians.default, (sq, hz, gram, True))
    h = torch.randn(12, 12, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.relflat.dense_block_trace.default,
                          (h, torch.randn(3, 4, dtype=torch.float64, device="cuda", requires_grad=True)))
    q = torch.randn(7, 5, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.relflat.gaussian_kernel_reduce.default,
                          (q, q + 1, torch.randn(7, 2, dtype=torch.float64, device="cuda"),
                           torch.tensor([0.5, 2.0], dtype=torch.float64, device="cuda"), None, None, None))


@pytest.mark.skipif(not GPU, reason="needs a GPU with the CUDA kernels")
def test_inputs_on_two_devices_get_the_argument_message():
    """The CUDA kernels check their arguments before taking the device guard."""
    q = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.relflat.gaussian_kernel_reduce(q, q.cuda(), None, torch.ones(1, device="cuda"), None, None, None)
    f, w, b = _head(4, 3, 2, seed=0)
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.relflat.last_layer_flatness_backward(torch.ones(4).double(), torch.empty(0, 0).double(), f,
                                                       w.cuda(), None, "cross_entropy")


@pytest.mark.skipif(not GPU, reason="needs a GPU with the CUDA kernels")
def test_block_sums_are_the_same_from_run_to_run():
    """No float atomics in the block sums: the same inputs give the same bits."""
    g = torch.Generator().manual_seed(4)
    hz = torch.randn(20000, 33, 33, generator=g).cuda()
    sq, gram = torch.rand(20000, generator=g).cuda(), torch.randn(33, 33, generator=g).cuda()
    f, w, b = _head(20000, 64, 40, seed=4, dtype=torch.float32, device="cuda")
    for op, args in ((torch.ops.relflat.contract_output_hessians, (sq, hz, gram, True)),
                     (torch.ops.relflat.last_layer_flatness, (f, w, b, "cross_entropy", True, True))):
        first = op(*args)[1]
        for _ in range(3):
            assert torch.equal(op(*args)[1], first)
