"""Small random networks for the tests (float64 unless asked otherwise), and training to a confident minimum."""
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


def confident_head(d, m, loss, margin, n=200, seed=0):
    """(x, w, b, y) in float64 for a head ``z = W x + b`` at a given logit margin: W = randn / 8;
    cross entropy: bias[0] = margin (class 0 wins by about the margin, labels 0); BCE with
    logits: every bias = margin (targets 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=g, dtype=torch.float64)
    w = torch.randn(d, m, generator=g, dtype=torch.float64) / 8
    b = torch.zeros(d, dtype=torch.float64)
    if loss == "cross_entropy":
        b[0] = margin
        y = torch.zeros(n, dtype=torch.long)
    else:
        b[:] = margin
        y = torch.ones(n, d, dtype=torch.float64)
    return x, w, b, y


def behind_a_layer(w, b, seed=1):
    """Linear(m, m) (near the identity, so margins survive) -> Tanh -> the head (W, b), float64."""
    d, m = w.shape
    g = torch.Generator().manual_seed(seed)
    first, head = nn.Linear(m, m).double(), nn.Linear(m, d).double()
    with torch.no_grad():
        first.weight.copy_(torch.eye(m, dtype=torch.float64) + 0.01 * torch.randn(m, m, generator=g, dtype=torch.float64))
        first.bias.zero_()
        head.weight.copy_(w)
        head.bias.copy_(b)
    return nn.Sequential(first, nn.Tanh(), head)


def train_to_minimum(model, x, y, steps, lr, loss=None, below=1e-3):
    """Full-batch Adam for ``steps``: the confident minima where flatness is measured. Asserts the
    last training loss is below ``below``; returns the model in eval mode."""
    loss = loss or torch.nn.functional.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        value = loss(model(x), y)
        value.backward()
        opt.step()
    assert value.item() < below, f"training stopped at loss {value.item():.2e}"
    return model.eval()
