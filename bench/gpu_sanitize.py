"""Tiny calls that reach every CUDA kernel branch once, for compute-sanitizer (bench/gpu.sh runs
it under memcheck and racecheck): last_layer_flatness with d <= 8, 16 and 32 (the fused warp
kernel, each loss, with and without the block sum), d > 32 with m < d and with m >= d, the block
alone; its backward (per-sample and block gradients); contract_output_hessians; dense_block_trace;
contract_output_hessians on a permuted hz with its columns split; gaussian_kernel_reduce with
values, per-key scales and splits, over several query blocks, key slices and pair groups, in both
dtypes. Sizes are odd so that every partial tile and tail is reached.

    compute-sanitizer --tool memcheck python -m bench.gpu_sanitize [cuda|cpu]
"""
import sys

import torch

import relflat_ext  # noqa: F401 (registers the ops)


def main(device: str = "cuda"):
    dev = torch.device(device)
    ops = torch.ops.relflat
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dev)  # noqa: E731
    for n, m, d in [(9, 5, 3), (9, 33, 9), (9, 17, 17), (9, 33, 33), (9, 40, 70), (9, 7, 40)]:
        f, w, b = rand(n, m), rand(d, m) / m ** 0.5, rand(d)
        for loss in ("cross_entropy", "mse", "bce_with_logits"):
            ops.last_layer_flatness(f, w, b, loss, True, True)
            ops.last_layer_flatness(f, w, None, loss, False, True)
            ops.last_layer_flatness(f, w, b, loss, True, False)
            ops.last_layer_flatness_backward(rand(n), torch.empty(0, 0, device=dev), f, w, b, loss)
            ops.last_layer_flatness_backward(rand(n), rand(d, d), f, w, None, loss)
    ops.contract_output_hessians(rand(9).abs(), rand(9, 5, 3), rand(5, 3), True)
    ops.contract_output_hessians(rand(17), rand(17, 33, 33), rand(33, 33), False)
    ops.contract_output_hessians(rand(3), rand(65, 3, 33).permute(1, 2, 0), rand(33, 65), True)  # strided, split
    ops.dense_block_trace(rand(15, 15), rand(3, 5))
    q, k = rand(37, 11), rand(53, 11)
    ops.gaussian_kernel_reduce(q, k, rand(53, 2), torch.tensor([0.5, 2.0], device=dev), rand(53).abs() + 0.5,
                               torch.randint(0, 3, (2, 37), generator=g).to(dev),
                               torch.randint(0, 3, (2, 53), generator=g).to(dev))
    ops.gaussian_kernel_reduce(q, k, None, torch.tensor([1.0], device=dev), None, None, None)
    # two query blocks, many key tiles and slices, more (split, bandwidth) pairs than a block holds
    q, k, bws = rand(130, 11), rand(200, 11), torch.linspace(0.5, 3.0, 5, device=dev)
    ids_q, ids_k = (torch.randint(0, 3, (2, n), generator=g).to(dev) for n in (130, 200))
    for dtype in (torch.float32, torch.float64):
        ops.gaussian_kernel_reduce(q.to(dtype), k.to(dtype), rand(200, 3).to(dtype), bws.to(dtype), None, ids_q, ids_k)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"every branch reached on {dev}")


if __name__ == "__main__":
    main(*sys.argv[1:])
