"""The shared probes' quadratic forms with F.linear and convolution weights contracted in the second backward
(core.linear_forms) equal the ones from the full Hessian-vector products, probe by probe, on the
models where the contraction applies, partly applies, or must not."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from relflat_ext.core import linear_forms
from relflat_ext.flatness import stochastic
from models import data, mlp


class TokenClassifier(nn.Module):
    def __init__(self, width=8, vocab=11, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0,
                                                                        batch_first=True), 2,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class TiedLM(nn.Module):
    """Token logits from an embedding whose table is also the output head (F.linear on it)."""

    def __init__(self, vocab=9, width=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)

    def forward(self, tokens):
        return F.linear(torch.tanh(self.mix(self.embed(tokens))), self.embed.weight)


class Recurrent(nn.Module):
    """One Linear applied three times (its weight has three F.linear uses), and a weight used both
    through F.linear and as ``x @ W.t()``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.cell = nn.Linear(5, 5)
        self.odd = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(self.cell(h))
        h = torch.sigmoid(self.odd(h)) + h @ self.odd.weight.t()
        return self.out(h)


class Convolutions(nn.Module):
    """Conv1d with stride and groups, with dilation and circular padding, "same" padding (not
    contracted: found as a plain use), a Conv3d on a reshaped signal, then a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, groups=2)
        self.c2 = nn.Conv1d(4, 4, 3, dilation=2, padding=2, padding_mode="circular")
        self.c3 = nn.Conv1d(4, 3, 1, bias=False)
        self.same = nn.Conv1d(3, 2, 3, padding="same")
        self.c3d = nn.Conv3d(1, 2, (1, 2, 2), padding=(0, 1, 0))
        self.out = nn.Linear(2 * 1 * 3 * 1, 3)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        h = torch.tanh(self.same(torch.tanh(self.c3(h))))  # (n, 2, 4)
        h = torch.tanh(self.c3d(h.reshape(-1, 1, 1, 2, 4)))  # (n, 2, 1, 3, 3)
        return self.out(h[..., 0].flatten(1))


class WeightAsData(nn.Module):
    """``a.weight`` multiplies the input and is also the data of ``w``'s product (torch.addmm, as
    transformers' Conv1D calls it: no reshape between the weight and the product)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.w, self.bias = nn.Parameter(torch.randn(4, 3) / 2), nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return torch.tanh(self.a(x)) @ torch.addmm(self.bias, self.a.weight, self.w)


class BothOrientations(nn.Module):
    """A square Linear applied as ``F.linear`` and as ``torch.addmm(bias, h, W)`` (its weight
    multiplying the other way): one layer whose calls perturb inputs and need V itself."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.square = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.square(h)) + torch.tanh(torch.addmm(self.square.bias, h, self.square.weight))
        return self.out(h)


def _record_perturbed(monkeypatch):
    """The set that collects the layers whose products come from probe coordinates."""
    seen = set()
    for name in ("perturbed_input", "perturbed_product"):
        original = getattr(linear_forms.LinearForms, name)
        monkeypatch.setattr(linear_forms.LinearForms, name,
                            lambda self, key, x, l, *rest, original=original: seen.add(l) or original(self, key, x, l,
                                                                                                      *rest))
    return seen


def _cases():
    torch.manual_seed(0)
    x, y = data(24, 5, 3, "cross_entropy", seed=1)
    yield "tanh MLP", mlp([5, 7, 6, 3], "tanh", seed=1), ["0", "2", "4"], x, y, "cross_entropy", None
    yield "GELU MLP, no biases, MSE", mlp([5, 6, 3], "gelu", seed=2, bias=False), ["0", "2"], x, \
        data(24, 5, 3, "mse", seed=1)[1], "mse", None
    yield "tanh MLP, batches of 10", mlp([5, 7, 3], "tanh", seed=3), ["0", "2"], x, y, "cross_entropy", 10
    torch.manual_seed(1)
    tokens, labels = torch.randint(0, 11, (4, 6)), torch.randint(0, 3, (4,))
    model = TokenClassifier().double().eval()
    names = ["embed", "encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.self_attn.out_proj",
             "encoder.layers.1.linear1", "encoder.layers.1.linear2", "head"]
    yield "transformer (MultiheadAttention's projections)", model, names, tokens, labels, "cross_entropy", None
    torch.manual_seed(2)
    tokens = torch.randint(0, 9, (3, 5))
    targets = torch.randint(0, 9, (3, 5))
    targets[0, :2] = -100
    yield "tied embedding", TiedLM().double(), ["embed", "mix"], tokens, targets, "cross_entropy", None
    torch.manual_seed(3)
    yield "recurrent and mixed uses", Recurrent().double(), ["inp", "cell", "odd", "out"], x[:, :4], y, \
        "cross_entropy", None
    torch.manual_seed(6)
    yield "a weight also the data of another product", WeightAsData().double(), ["a", "w"], x[:, :4], y, \
        "cross_entropy", None
    torch.manual_seed(4)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 5), nn.Tanh(),
                        nn.Linear(5, 3)).double()
    yield "convolution and Linear", cnn, ["0", "3", "5"], torch.randn(10, 1, 6, 6, dtype=torch.float64), y[:10], \
        "cross_entropy", None
    torch.manual_seed(5)
    yield "convolutions: strides, groups, dilation, circular padding, 'same', 1-d and 3-d", Convolutions().double(), \
        ["c1", "c2", "c3", "same", "c3d", "out"], torch.randn(6, 2, 9, dtype=torch.float64), y[:6], "cross_entropy", None
    torch.manual_seed(7)
    yield "a weight multiplying both ways", BothOrientations().double(), ["inp", "square", "out"], x[:, :4], y, \
        "cross_entropy", None


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("sketch", [0, 4])
def test_contracted_forms_equal_the_full_products(case, sketch, monkeypatch):
    _, model, names, x, y, loss, batch_size = case
    kwargs = dict(loss=loss, batch_size=batch_size, sketch=sketch, max_probes=2 * sketch + 3, probes_per_round=3,
                  rel_tol=1e-12, seed=5)
    calls = []
    original = linear_forms._Contracted.apply
    monkeypatch.setattr(linear_forms._Contracted, "apply", lambda *a: calls.append(a[5]) or original(*a))
    contracted = rf.stochastic_estimate_layers(model, names, x, y, **kwargs)
    assert calls, "no F.linear weight was contracted"
    monkeypatch.setattr(stochastic, "CONTRACT", False)
    full = rf.stochastic_estimate_layers(model, names, x, y, **kwargs)
    for name in names:
        a, b = contracted[name].samples, full[name].samples
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * b.abs().max()), (name, a, b)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_layer_at_a_time_too(case, monkeypatch):
    """The per-layer estimator's forms, contracted, equal its full products probe by probe."""
    _, model, names, x, y, loss, batch_size = case
    kwargs = dict(loss=loss, batch_size=batch_size, max_probes=3, probes_per_round=3, rel_tol=1e-12, seed=5)
    contracted = {name: rf.stochastic_estimate(model, name, x, y, **kwargs) for name in names}
    monkeypatch.setattr(stochastic, "CONTRACT", False)
    for name in names:
        a, b = contracted[name].samples, rf.stochastic_estimate(model, name, x, y, **kwargs).samples
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * b.abs().max()), (name, a, b)


def test_one_layer_in_theorem_4_coordinates_too(monkeypatch):
    """The per-layer estimator's probes for the normalized kappa, W S A S^{-1} (one feature's scale
    zero: dropped), kept as coordinates S A S^{-1} of W (m <= d): the full products' forms."""
    model = mlp([5, 4, 8, 3], "tanh", seed=4)
    x, y = data(20, 5, 3, "cross_entropy", seed=4)
    scale = torch.tensor([0.5, 2.0, 0.0, 1.3], dtype=torch.float64)
    kwargs = dict(max_probes=3, probes_per_round=3, rel_tol=1e-12, seed=2, feature_scale=scale)
    seen = _record_perturbed(monkeypatch)
    a = rf.stochastic_estimate(model, "2", x, y, **kwargs).samples
    assert seen == {0}
    monkeypatch.setattr(stochastic, "CONTRACT", False)
    b = rf.stochastic_estimate(model, "2", x, y, **kwargs).samples
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * b.abs().max()), (a, b)


@pytest.mark.parametrize("case, expected", [(CASES[4], {0}), (CASES[5], {2}), (CASES[6], {0})],
                         ids=["tied", "x @ W.t()", "weight as data"])
def test_a_weight_also_used_otherwise_is_measured_from_the_full_product(case, expected, monkeypatch):
    """The tied table and ``odd`` (also used as ``x @ W.t()``) are found in the graph after the first
    forward and never contracted; the others are."""
    _, model, names, x, y, loss, _ = case
    mixed, forms = [], stochastic.contracted_quadratic_forms
    monkeypatch.setattr(stochastic, "contracted_quadratic_forms", lambda *a: (forms(*a), mixed.append(set(a[-1])))[0])
    rf.stochastic_estimate_layers(model, names, x, y, loss=loss, sketch=0, max_probes=4, seed=0)
    assert mixed and all(m == expected for m in mixed)


@pytest.mark.parametrize("case, contracted", [(CASES[3], {1, 2, 3, 4, 5}), (CASES[8], {0, 1, 2, 4, 5})],
                         ids=["transformer", "convolutions"])
def test_which_layers_are_contracted(case, contracted, monkeypatch):
    """Attention's projections, the feed-forward layers, the head and the convolutions with
    numeric padding are; the embedding (a lookup) and the "same"-padded convolution are not."""
    _, model, names, x, y, loss, _ = case
    calls = set()
    original = linear_forms._Contracted.apply
    monkeypatch.setattr(linear_forms._Contracted, "apply", lambda *a: calls.add(a[5]) or original(*a))
    rf.stochastic_estimate_layers(model, names, x, y, loss=loss, sketch=0, max_probes=2, seed=0)
    assert calls == contracted


@pytest.mark.parametrize("case, perturbed", [(CASES[3], {1, 2, 3}), (CASES[9], {0, 1})],
                         ids=["transformer", "both ways"])
def test_layers_with_m_at_most_d_take_their_products_from_probe_coordinates(case, perturbed, monkeypatch):
    """Where V = W P and the weight multiplies rows (attention's in- and out-projections, the
    up-projection; ``square`` through its F.linear call), the products perturb the layer's input
    instead; V is formed only for ``square``, whose torch.addmm call needs it."""
    _, model, names, x, y, loss, _ = case
    seen, formed = _record_perturbed(monkeypatch), []
    weight = linear_forms.ProbeDirections.weight
    monkeypatch.setattr(linear_forms.ProbeDirections, "weight",
                        lambda self, l: (formed.append(l) if self.weights[l] is None else None) or weight(self, l))
    rf.stochastic_estimate_layers(model, names, x, y, loss=loss, sketch=0, max_probes=2, seed=0)
    assert seen == perturbed
    assert set(formed) == ({1} if case is CASES[9] else set())


def test_the_forward_leaves_the_functions_as_they_were():
    model = mlp([4, 3, 2], "tanh", seed=1)
    x, y = data(10, 4, 2, "cross_entropy", seed=1)
    before = {name: getattr(F, name) for name in ("linear", "conv1d", "conv2d", "conv3d")}
    before_addmm = torch.addmm
    rf.stochastic_estimate_layers(model, ["0", "2"], x, y, sketch=0, max_probes=4, seed=0)
    assert all(getattr(F, name) is f for name, f in before.items()) and torch.addmm is before_addmm
    assert F.linear is torch._C._nn.linear and F.conv2d is torch.conv2d

    class FailsWhenIntercepted(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 2)

        def forward(self, x):
            if F.linear is not torch._C._nn.linear:
                raise RuntimeError("a forward that fails")
            return self.layer(x)

    with pytest.raises(RuntimeError, match="a forward that fails"):
        rf.stochastic_estimate_layers(FailsWhenIntercepted(), ["layer"], torch.randn(5, 4),
                                      torch.randint(0, 2, (5,)), sketch=0, max_probes=4, seed=0)
    assert all(getattr(F, name) is f for name, f in before.items()) and torch.addmm is before_addmm


def _trained_float32(kind):
    from models import train_to_minimum
    if kind == "MLP":
        model = mlp([6, 16, 16, 4], "tanh", seed=7)
        x, y = data(64, 6, 4, "cross_entropy", seed=7)
        train_to_minimum(model, x, y, steps=800, lr=0.05, below=1e-3)
        return model.float(), x.float(), y, ["0", "2", "4"]
    torch.manual_seed(1)
    model = TokenClassifier(width=16)
    x, y = torch.randint(0, 11, (16, 6)), torch.randint(0, 3, (16,))
    train_to_minimum(model, x, y, steps=300, lr=1e-2, below=1e-3)
    return model, x, y, ["encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.1.linear1", "head"]


@pytest.mark.parametrize("kind", ["MLP", "transformer"])
def test_float32_forms_on_a_trained_network_agree_with_the_full_products(kind, monkeypatch):
    """At a confident minimum (train loss < 1e-3), in float32: the contracted forms and the full
    products' agree to float32 rounding (they sum different products; measured 1.1e-7 / 4.5e-7 with
    the transformer's projections from probe coordinates)."""
    model, x, y, names = _trained_float32(kind)
    kwargs = dict(sketch=0, max_probes=6, probes_per_round=6, rel_tol=1e-12, seed=3)
    contracted = rf.stochastic_estimate_layers(model, names, x, y, **kwargs)
    monkeypatch.setattr(stochastic, "CONTRACT", False)
    full = rf.stochastic_estimate_layers(model, names, x, y, **kwargs)
    for name in names:
        a, b = contracted[name].samples.double(), full[name].samples.double()
        assert (a - b).abs().max() <= 2e-6 * b.abs().max(), name


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_conv1d_and_head_contracted_and_equal(tied, monkeypatch):
    """transformers' Conv1D (torch.addmm(bias, x, W)) is contracted, its products from probe
    coordinates (W^T stored: "columns"); the head is too where untied, and found as the
    embedding's second use where tied."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=13, n_positions=8, bos_token_id=0,
                                     eos_token_id=0, tie_word_embeddings=tied)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 13, (3, 6))
    batch = {"input_ids": ids, "labels": ids}
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj", "lm_head"]
    kwargs = dict(sketch=0, max_probes=3, probes_per_round=3, rel_tol=1e-12, seed=1)
    calls, mixed, perturbed = set(), [], _record_perturbed(monkeypatch)
    original, forms = linear_forms._Contracted.apply, stochastic.contracted_quadratic_forms
    monkeypatch.setattr(linear_forms._Contracted, "apply", lambda *a: calls.add(a[5]) or original(*a))
    monkeypatch.setattr(stochastic, "contracted_quadratic_forms", lambda *a: (forms(*a), mixed.append(set(a[-1])))[0])
    contracted = rf.stochastic_estimate_layers(model, names, batch, **kwargs)
    assert calls == {0, 1, 2, 3} and mixed == [{3} if tied else set()]
    assert perturbed == ({0, 1, 2} if tied else {0, 1, 2, 3})  # m <= d everywhere
    monkeypatch.setattr(stochastic, "CONTRACT", False)
    full = rf.stochastic_estimate_layers(model, names, batch, **kwargs)
    for name in names:
        a, b = contracted[name].samples, full[name].samples
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * b.abs().max()), (name, a, b)
