"""Language-model conventions: logits (batch, seq, vocab) against token targets (batch, seq), the
mean over tokens with ignore_index=-100, and a head tied to the embedding."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from relflat_ext.core.losses import LOSSES

V, E, B, S = 11, 6, 4, 5


class TinyLM(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.mix = nn.Linear(E, E)
        self.head = nn.Linear(E, V, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def _tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, S), generator=g)
    y = torch.randint(0, V, (B, S), generator=g)
    y[0, :2] = -100  # padding, ignored as F.cross_entropy ignores it
    return x, y


def test_token_loss_is_the_mean_over_tokens():
    logits = torch.randn(B, S, V, dtype=torch.float64)
    _, y = _tokens()
    want = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    torch.testing.assert_close(LOSSES["cross_entropy"](logits, y), want)
    torch.testing.assert_close(LOSSES["cross_entropy"].for_derivatives(logits, y), want)
    with pytest.raises(ValueError, match=r"token indices \(4, 5\)"):
        LOSSES["cross_entropy"].check(logits, y[:, :3])
    with pytest.raises(ValueError, match=r"class indices in \[0, 11\)"):
        LOSSES["cross_entropy"].check(logits, torch.full((B, S), V))


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_is_estimated_against_the_full_hessian(tied):
    torch.manual_seed(0)
    model = TinyLM(tied).double()
    x, y = _tokens()
    exact = rf.relative_flatness(model, "head", x, y, method="autograd").kappa
    est = rf.relative_flatness(model, "head", x, y, rel_tol=0.05, max_probes=600, seed=0)
    if not tied:  # an untied head on token targets: the closed form with tokens as samples
        assert est.method == "closed_form" and "tokens as samples" in est.reason
        assert abs(est.kappa - exact) <= 1e-10 * exact
        est = rf.relative_flatness(model, "head", x, y, method="stochastic", rel_tol=0.05, max_probes=600, seed=0)
    assert est.method == "stochastic" and ("tied weights" in est.reason) == tied
    assert abs(est.kappa - exact) <= 4 * est.kappa_stderr
