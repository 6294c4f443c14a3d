"""Small random networks for the tests (float64 unless asked otherwise)."""
import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "gelu": nn.GELU, "relu": nn.ReLU}


def mlp(widths, activation="tanh", seed=0, dtype=torch.float64, bias=True):
    torch.manual_seed(seed)
    layers = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if k < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).to(dtype)


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def data(n, m, d, loss, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=g, dtype=dtype)
    if loss == "cross_entropy":
        y = torch.randint(0, d, (n,), generator=g)
    elif loss == "bce_with_logits":
        y = torch.rand(n, d, generator=g, dtype=dtype)
    else:
        y = torch.randn(n, d, generator=g, dtype=dtype)
    return x, y


def snapshot(model):
    """Everything a measurement must leave unchanged."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["training"] == before["training"], "training flags changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad changed"
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    for a, b in zip(after["grad"], before["grad"]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), ".grad changed"
