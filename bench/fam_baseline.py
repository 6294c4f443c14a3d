"""A faithful re-implementation, for timing, of the authors' FAM regularizer (``FAMreg`` with a
``LayerHessian(method='functorch')`` and norm 'neuronwise', in their public repository's folder
RelativeFlatnessRegularizer(FAM)): the dense Hessian of the loss in the layer's weight by
forward-over-reverse differentiation of the whole model, then a double loop over neuron pairs.

Kept as they wrote it, because it is what is timed: each Hessian slice is copied into a new leaf
(their ``torch.tensor(H[...], requires_grad=True)``), so the gradient of the penalty flows only
through the dot products of the weight rows, not through the Hessian; the slice taken is
``H[:, j, i, :]`` of the (d, m, d, m) functorch layout (its trace runs over min(d, m) entries that
mix row and column indices; their autograd layout (m, d, d, m) is where that slice is the block
Tr(H_{j,i})); and the trace is divided by m.
"""
from __future__ import annotations

import torch
from torch import nn


def fam_neuronwise(model: nn.Module, param_name: str, inputs: torch.Tensor, targets: torch.Tensor,
                   loss_fn=torch.nn.functional.cross_entropy) -> torch.Tensor:
    layer = dict(model.named_parameters())[param_name]

    def loss_of(weight):
        return loss_fn(torch.func.functional_call(model, {param_name: weight}, (inputs,)), targets)

    hessian = torch.func.jacfwd(torch.func.jacrev(loss_of), randomness="same")(layer)  # (d, m, d, m)
    d, m = layer.shape
    regularization = torch.zeros(1, device=layer.device)
    for i in range(d):
        for j in range(d):
            block = hessian[:, j, i, :].detach().clone().requires_grad_(True)  # their gradient cut
            regularization = regularization + torch.dot(layer[i, :], layer[j, :]) * (torch.trace(block) / m)
    return regularization
