"""Representativeness in feature space and the bound estimate."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from relflat_ext.generalization.representativeness import CV_GRID, _random_folds
from models import assert_unchanged, data, mlp, snapshot

LOSS_FNS = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "bce_with_logits": F.binary_cross_entropy_with_logits}


def _setup(loss="cross_entropy", n=120, seed=0):
    model = mlp([6, 8, 7, 4], "tanh", seed=seed)
    x, y = data(n, 6, 4, loss, seed=seed)
    return model, x, y


@pytest.mark.parametrize("labels", ["held_out", "train"])
def test_near_zero_for_held_out_copies_with_their_labels(labels):
    model, x, y = _setup()
    rep = rf.representativeness(model, "2", x, y, delta=0.01, held_out=(x[:40], y[:40]), labels=labels)
    assert abs(rep.value) < 1e-6 and rep.per_sample.shape == (1, 40)


def test_grows_when_held_out_labels_are_flipped():
    """Against the train points' own labels (labels="train") a held-out copy whose label disagrees
    with its twin's costs its full loss difference; with the held-out label at both ends
    (labels="held_out") a copy is indistinguishable from its twin whatever the label."""
    model, x, _ = _setup()
    with torch.no_grad():
        model[4].weight.mul_(10)  # confident predictions; labels = what the model predicts
        out = model(x)
    y, flipped = out.argmax(1), out[:40].argmin(1)
    grown = rf.representativeness(model, "2", x, y, delta=0.01, held_out=(x[:40], flipped), labels="train")
    expected = (F.cross_entropy(out[:40], flipped, reduction="none")
                - F.cross_entropy(out[:40], y[:40], reduction="none")).mean()
    assert grown.value == pytest.approx(float(expected), rel=1e-6) and grown.value > 1.0
    blind = rf.representativeness(model, "2", x, y, delta=0.01, held_out=(x[:40], flipped), labels="held_out")
    assert abs(blind.value) < 1e-6


@pytest.mark.parametrize("labels", ["train", "held_out"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
@pytest.mark.parametrize("bandwidth", ["relative", 0.7])
def test_matches_brute_force_weights_and_losses(loss, bandwidth, labels):
    """rep_q = l(f(x_q), y_q) - sum_k w_qk l(f(x_k), y_k or y_q), w from the Gaussian kernels, term by term."""
    model, x, y = _setup(loss, n=50)
    xq, yq = data(15, 6, 4, loss, seed=9)
    rep = rf.representativeness(model, "2", x, y, delta=0.3, bandwidth=bandwidth, loss=loss, held_out=(xq, yq),
                                labels=labels)
    with torch.no_grad():
        phi, phq = model[:2](x), model[:2](xq)
        out, outq = model(x), model(xq)
    h = 0.3 * phi.norm(dim=1) if bandwidth == "relative" else torch.full((50,), 0.7, dtype=torch.float64)
    logw = -torch.cdist(phq, phi).square() / (2 * h * h) - phi.shape[1] * torch.log(h)
    w = torch.softmax(logw, 1)  # (15, 50)
    fn = LOSS_FNS[loss]
    label = (lambda k, q: y[k:k + 1]) if labels == "train" else (lambda k, q: yq[q:q + 1])
    cross = torch.stack([torch.stack([fn(out[k:k + 1], label(k, q)) for k in range(50)]) for q in range(15)])
    own = torch.stack([fn(outq[q:q + 1], yq[q:q + 1]) for q in range(15)])
    torch.testing.assert_close(rep.per_sample[0], own - (w * cross).sum(1), rtol=1e-9, atol=1e-12)


def test_all_folds_from_one_pass_equal_each_fold_held_out_explicitly():
    model, x, y = _setup(n=60)
    rep = rf.representativeness(model, "0", x, y, delta=0.2, folds=4, repeats=2, seed=3)
    ids = _random_folds(60, 4, 2, 3, "cpu")
    for r in range(2):
        for f in range(4):
            held = ids[r] == f
            alone = rf.representativeness(model, "0", x[~held], y[~held], delta=0.2, held_out=(x[held], y[held]))
            torch.testing.assert_close(rep.per_sample[r, held], alone.per_sample[0], rtol=1e-10, atol=1e-12)
            assert float(rep.fold_values[r, f]) == pytest.approx(alone.value, rel=1e-10)
    assert rep.value == pytest.approx(float(rep.per_sample.mean()))
    assert rep.stderr == pytest.approx(float(rep.fold_values.std() / math.sqrt(8)))


def test_cv_bandwidth_is_chosen_by_held_out_likelihood():
    model, x, y = _setup(n=80)
    rep = rf.representativeness(model, "2", x, y, bandwidth="cv", folds=5, seed=0)
    assert isinstance(rep.bandwidth, float) and rep.bandwidth > 0
    with torch.no_grad():
        phi = model[:2](x)
    grid = CV_GRID * float(phi.var(0, unbiased=False).mean().sqrt()) * 80 ** (-1 / 12)  # m = 8
    assert rep.bandwidth == pytest.approx(rf.select_bandwidth(phi, grid, folds=5).bandwidth)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_bound_is_the_sum_of_its_parts(loss):
    model, x, y = _setup(loss)
    b = rf.generalization_bound(model, "2", x, y, delta=0.1, loss=loss, seed=1)
    rep = rf.representativeness(model, "2", x, y, delta=0.1, loss=loss, seed=1)
    kappa = rf.relative_flatness(model, "2", x, y, loss=loss).kappa
    assert b.representativeness == pytest.approx(rep.value)
    assert b.kappa == pytest.approx(kappa)
    assert b.feature_robustness == pytest.approx(0.01 / (2 * 8) * kappa)
    assert b.bound == pytest.approx(b.representativeness + b.feature_robustness)
    with torch.no_grad():
        assert b.empirical_risk == pytest.approx(float(LOSS_FNS[loss](model(x), y)))
    assert b.risk_estimate == pytest.approx(b.empirical_risk + b.bound)


def test_model_is_left_unchanged_and_loaders_stream():
    model, x, y = _setup()
    model.train()
    before = snapshot(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=33)
    a = rf.representativeness(model, "2", loader, seed=4)
    b = rf.representativeness(model, "2", x, y, seed=4)
    assert a.value == pytest.approx(b.value, rel=1e-12)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(folds=121), "folds"), (dict(folds=1), "folds"), (dict(delta=0.0), "delta"),
    (dict(bandwidth=-1.0), "bandwidth"), (dict(bandwidth="silverman"), "bandwidth"),
    (dict(repeats=0), "repeats"), (dict(labels="both"), "labels"),
    (dict(loss=lambda out, y: F.cross_entropy(out, y)), "built-in"),
])
def test_bad_input_is_rejected_clearly(kwargs, match):
    model, x, y = _setup()
    with pytest.raises(ValueError, match=match):
        rf.representativeness(model, "2", x, y, **kwargs)


def test_bad_data_is_rejected_clearly():
    model, x, y = _setup()
    with pytest.raises(ValueError, match="NaN"):
        rf.representativeness(model, "2", torch.where(x > 1, math.nan, x), y)
    with pytest.raises(ValueError, match="class indices"):
        rf.representativeness(model, "2", x, y + 10)
    with pytest.raises(ValueError, match="targets has 4 samples but inputs has 5"):
        rf.representativeness(model, "2", x, y, held_out=(x[:5], y[:4]))
    zero = mlp([6, 8, 7, 4], "relu", seed=0)
    with torch.no_grad():
        zero[0].weight.zero_()
        zero[0].bias.fill_(-1.0)
    with pytest.raises(ValueError, match="nonzero features"):
        rf.representativeness(zero, "2", x, y)


class _TokenLM(nn.Module):
    """A token-wise language model: each token's logits depend on that token alone (no attention),
    so tokens are samples; ``mix`` adds a causal running mean before the head (tokens mix)."""

    def __init__(self, vocab=12, width=6, mix=False):
        super().__init__()
        self.mix = mix
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        h = torch.tanh(self.body(self.embed(ids)))
        if self.mix:
            h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.head(h)


def _token_data(n, seq, vocab=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = torch.randint(0, vocab, (n, seq), generator=g)
    labels[:, 0] = -100  # ignored, as in a padded or shifted batch
    return ids, labels


@pytest.mark.parametrize("layer", ["head", "body"])
def test_tokens_are_points_where_the_model_output_is_per_token(layer):
    """Before: "the model output must be (n, d)". Against a held-out set the estimate is the same as
    for the flattened data, every counted token a sample and the ignored ones dropped."""
    torch.manual_seed(0)
    model = _TokenLM().double()
    ids, labels = _token_data(30, 5)
    q_ids, q_labels = _token_data(10, 5, seed=1)
    tokens = rf.representativeness(model, layer, ids, labels, held_out=(q_ids, q_labels))
    keep, q_keep = labels.reshape(-1) != -100, q_labels.reshape(-1) != -100
    flat = rf.representativeness(model, layer, ids.reshape(-1, 1)[keep], labels.reshape(-1, 1)[keep],
                                 held_out=(q_ids.reshape(-1, 1)[q_keep], q_labels.reshape(-1, 1)[q_keep]))
    assert tokens.n == int(keep.sum()) and tokens.value == pytest.approx(flat.value, rel=1e-10)
    folds = rf.representativeness(model, layer, ids, labels, folds=5, seed=0)
    assert folds.per_sample.shape == (1, int(keep.sum())) and math.isfinite(folds.value)
    with pytest.raises(ValueError, match=r"must not exceed the number of samples \(30\)"):
        rf.representativeness(model, layer, ids, labels, folds=31)


def test_tokens_are_not_points_where_the_model_mixes_them_after_the_layer():
    model = _TokenLM(mix=True).double()
    ids, labels = _token_data(8, 5)
    with pytest.raises(ValueError, match="mixes tokens.*one feature vector per output"):
        rf.representativeness(model, "body", ids, labels)
    assert math.isfinite(rf.representativeness(model, "head", ids, labels, folds=4).value)


def test_a_layer_on_positions_under_a_per_sample_output_gets_a_clear_error():
    class Pooled(_TokenLM):
        def forward(self, ids):
            return super().forward(ids).mean(1)  # one output per sequence

    ids, labels = _token_data(8, 5)
    with pytest.raises(ValueError, match=r"feature vector per position \(8, 5, 6\)"):
        rf.representativeness(Pooled().double(), "body", ids, labels[:, 1] % 12)


def test_float32_at_a_confident_minimum_equals_float64():
    """Where users measure: a float32 MLP trained to loss 5e-5. Its per-sample losses, taken in
    float32 (logits of size 10-20, a loss near 1e-4), kept too few digits: Rep was off its float64
    copy's by 2e-4 to 1e-3 (relative); the losses now come in float64, as feature robustness takes
    them (measured: 1.5e-5 at worst, same folds)."""
    import copy
    from models import train_to_minimum
    torch.manual_seed(0)
    x, y = torch.randn(300, 20), torch.randint(0, 5, (300,))
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    train_to_minimum(model, x, y, steps=1500, lr=3e-3, below=1e-4)
    model64 = copy.deepcopy(model).double()
    for layer in ("2", "4"):
        for delta in (0.01, 0.1):
            r32 = rf.representativeness(model, layer, x, y, delta=delta, seed=0)
            r64 = rf.representativeness(model64, layer, x.double(), y, delta=delta, seed=0)
            assert abs(r32.value - r64.value) <= 5e-5 * abs(r64.value), (layer, delta, r32.value, r64.value)


def test_a_callable_loss_is_refused_with_the_way_round_it():
    """Representativeness needs every label's loss, so a built-in loss; a model returning (logits,
    features) is measured through a wrapper that returns the logits, as the error says."""
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.head(h), h

    class Logits(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)[0]
    torch.manual_seed(0)
    model, x, y = Pair().double(), torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    with pytest.raises(ValueError, match="wrapper whose forward returns its logits"):
        rf.representativeness(model, "head", x, y, loss=lambda out, t: F.cross_entropy(out[0], t))
    assert math.isfinite(rf.representativeness(Logits(model), "model.head", x, y, seed=0).value)
