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


@pytest.mark.parametrize("method", ["exact", "stochastic", "auto", "autograd"])
def test_labels_all_ignored_get_a_clear_error_on_every_path(method):
    """Before: NaN (the estimator, the baseline) or a ZeroDivisionError (the exact paths)."""
    x, y = _tokens()
    with pytest.raises(ValueError, match="every target is -100"):
        rf.relative_flatness(TinyLM(False).double(), "mix", x, torch.full_like(y, -100), method=method)


def test_features_labelled_minus_100_do_not_count_in_the_features_given_call():
    """Before: relative_flatness_from_features averaged over every row, while the model-level call
    (and F.cross_entropy) leaves out the rows labelled -100."""
    g = torch.Generator().manual_seed(1)
    f, w = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, -100, 2, -100, 1, 0, 2, -100])
    kept = rf.relative_flatness_from_features(f[y != -100], w, y[y != -100])
    got = rf.relative_flatness_from_features(f, w, y)
    head = nn.Sequential(nn.Linear(4, 3, bias=False)).double()
    head[0].weight.data.copy_(w)
    assert got.kappa == pytest.approx(kept.kappa, rel=1e-12) and got.n == 6
    assert got.kappa == pytest.approx(rf.relative_flatness(head, "0", f, y).kappa, rel=1e-12)
    assert got.kappa != pytest.approx(rf.relative_flatness_from_features(f, w, y.clamp(min=0)).kappa, rel=1e-3)
    with pytest.raises(ValueError, match="every target is -100"):
        rf.relative_flatness_from_features(f, w, torch.full_like(y, -100))


def test_theorem_4_scales_leave_out_the_samples_labelled_minus_100():
    """Before: the features' standard deviations were taken over every sample, the ignored ones too
    (39.36 against 36.18 here), while kappa sums over the counted ones."""
    g = torch.Generator().manual_seed(2)
    f = torch.randn(12, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.2, 3.0], dtype=torch.float64)
    y = torch.tensor([0, 1, -100, 2, -100, 1, 0, 2, -100, 1, 1, 0])
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    kept = y != -100
    for layer in ("0", "2"):
        got = rf.relative_flatness(mlp, layer, f, y, normalize_features=True).kappa
        want = rf.relative_flatness(mlp, layer, f[kept], y[kept], normalize_features=True).kappa
        assert got == pytest.approx(want, rel=1e-12), layer
        assert got == pytest.approx(rf.relative_flatness_autograd(mlp, layer, f[kept], y[kept],
                                                                  normalize_features=True).kappa, rel=1e-10)


def test_representativeness_leaves_out_samples_labelled_minus_100():
    """Before: kernel points with a loss of 0 (0.72 against 0.18 here); tokens were already left out."""
    g = torch.Generator().manual_seed(3)
    x, xt = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(10, 4, generator=g, dtype=torch.float64)
    y, yt = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (10,), generator=g)
    y[::4] = -100
    yt_ignored = yt.clone()
    yt_ignored[::3] = -100
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    kept, kept_t = y != -100, yt_ignored != -100
    got = rf.representativeness(model, "2", x, y, held_out=(xt, yt_ignored)).value
    want = rf.representativeness(model, "2", x[kept], y[kept], held_out=(xt[kept_t], yt[kept_t])).value
    assert got == pytest.approx(want, rel=1e-12)
