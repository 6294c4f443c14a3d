"""Attention: fused scaled-dot-product kernels have no double backward, and nn.MultiheadAttention
uses out_proj's weight without calling its forward. Both must work (or fail clearly)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf


class TinyAttention(nn.Module):
    """One self-attention block over (batch, seq, width) then a mean-pooled classifier; ``fused``
    uses F.scaled_dot_product_attention, otherwise an explicit softmax."""

    def __init__(self, fused: bool, width=8, classes=3):
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        b, s, w = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, w // 2).permute(2, 0, 3, 1, 4)  # 2 heads: (b, 2, s, w/2)
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        return self.head(self.proj(a.transpose(1, 2).reshape(b, s, w)).mean(1))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize("method", ["stochastic", "autograd"])
def test_fused_attention_equals_explicit_attention(method):
    torch.manual_seed(0)
    explicit = TinyAttention(fused=False)  # float32: where the fused CPU kernel (flash) is chosen
    fused = TinyAttention(fused=True)
    fused.load_state_dict(explicit.state_dict())
    x, y = _data()
    x = x.float()
    kwargs = dict(method=method, seed=0, max_probes=16) if method == "stochastic" else dict(method=method)
    layer = "qkv"  # before the attention: its double backward is needed
    want = rf.relative_flatness(explicit, layer, x, y, **kwargs).kappa
    got = rf.relative_flatness(fused, layer, x, y, **kwargs).kappa
    assert got == pytest.approx(want, rel=1e-4)


def test_multihead_attention_out_proj():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True,
                                                             dropout=0.0), num_layers=1).double()
    head = nn.Linear(8, 3).double()
    net = nn.Sequential(model, nn.Flatten(1), nn.LazyLinear(3)).double()
    x, _ = _data()
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    net(x)  # materialize the lazy head
    layer = "0.layers.0.self_attn.out_proj"
    with pytest.raises(ValueError, match="did not call layer"):
        rf.relative_flatness(net, layer, x, y, method="exact")
    auto = rf.relative_flatness(net, layer, x, y, rel_tol=0.05, max_probes=400, seed=0)
    assert auto.method == "stochastic" and "did not call the layer's forward" in auto.reason
    exact = rf.relative_flatness(net, layer, x, y, method="autograd").kappa
    assert abs(auto.kappa - exact) <= 4 * auto.kappa_stderr
    with pytest.raises(ValueError, match="did not call layer"):
        rf.feature_robustness(net, layer, x, y)
    del head


def test_multihead_attention_in_proj_weight_by_parameter_name():
    """MultiheadAttention's packed q/k/v projection is a parameter without a module: measured from
    the weight by the estimator, against the full Hessian of that parameter."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0),
                        nn.Flatten(1), nn.Linear(40, 3)).double()
    x, _ = _data()
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    name = "0.self_attn.in_proj_weight"
    exact = rf.relative_flatness(net, name, x, y, method="autograd").kappa
    est = rf.relative_flatness(net, name, x, y, rel_tol=0.05, max_probes=400, seed=0)
    assert est.method == "stochastic" and "parameter named directly" in est.reason
    assert abs(est.kappa - exact) <= 4 * est.kappa_stderr
    with pytest.raises(ValueError, match="is a parameter, not a module"):
        rf.relative_flatness(net, name, x, y, method="exact")
    rows = rf.profile(net, x, y, max_probes=32, rel_tol=0.5, hessian_trace=False, progress=False).rows
    assert name in [r["layer"] for r in rows] and all(math.isfinite(r["kappa"]) for r in rows)


def test_multihead_attention_with_separate_key_and_value_sizes():
    """With kdim/vdim apart from the embedding size, MultiheadAttention keeps q, k and v projections
    as three parameters: each is listed by the profile and estimated against its full Hessian."""
    torch.manual_seed(0)

    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            q, k, v = x[..., :8], x[..., 8:12], x[..., 12:]
            return self.head(self.attn(q, k, v, need_weights=False)[0].mean(1))

    net = CrossAttention().double()
    x = torch.randn(6, 5, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    rows = rf.profile(net, x, y, max_probes=8, rel_tol=0.5, hessian_trace=False, progress=False).rows
    assert [r["layer"] for r in rows] == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                                          "attn.out_proj", "head"]
    for name in ("attn.k_proj_weight", "attn.v_proj_weight"):
        exact = rf.relative_flatness(net, name, x, y, method="autograd").kappa
        est = rf.relative_flatness(net, name, x, y, rel_tol=0.05, max_probes=400, seed=0)
        assert abs(est.kappa - exact) <= 4 * est.kappa_stderr, (name, est.kappa, est.kappa_stderr, exact)
