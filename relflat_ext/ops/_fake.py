"""Fake (meta) kernels of the compiled ops: output shapes for tracing and torch.compile."""
import torch

from ._extension import HAS_EXTENSION

if HAS_EXTENSION:
    # Shapes for tracing / torch.compile (FakeTensor): mirrors the kernels' outputs.
    @torch.library.register_fake("relflat::last_layer_flatness")
    def _(features, weight, bias, loss, block_trace, per_sample=True):
        d = weight.shape[0] if block_trace or not per_sample else 0
        return features.new_empty(features.shape[0] if per_sample else 0), features.new_empty((d, d))

    @torch.library.register_fake("relflat::last_layer_flatness_backward")
    def _(grad_per_sample, grad_block, features, weight, bias, loss):
        return (torch.empty_like(features), torch.empty_like(weight),
                torch.empty_like(bias) if bias is not None else features.new_empty(0))

    @torch.library.register_fake("relflat::contract_output_hessians")
    def _(sq_norms, hz, gram, block_trace):
        shape = tuple(gram.shape) if block_trace else (0, 0)
        return sq_norms.new_empty(hz.shape[0]), hz.new_empty(shape)

    @torch.library.register_fake("relflat::dense_block_trace")
    def _(hessian, weight):
        d = weight.shape[0]
        return weight.new_empty(()), weight.new_empty((d, d))

    @torch.library.register_fake("relflat::gaussian_kernel_reduce")
    def _(queries, keys, values, bandwidths, key_scale, query_split, key_split):
        n_splits = 1 if query_split is None else query_split.shape[0]
        c = 0 if values is None else values.shape[1]
        shape = (n_splits, bandwidths.shape[0], queries.shape[0])
        return queries.new_empty(shape), queries.new_empty(shape + (c,))
