"""Embedding tables as feature layers: ``embedding(x) = one_hot(x) @ weight``, so W is
``weight.T`` (dim, vocab) and the features are one-hot token vectors (counts for a bag). Checked
against the same model written with an nn.Linear on one-hot inputs, whose kappa the library has
always computed: the full Hessians must give the same number, and the estimator must find it
whether the table is named as a module, as a parameter, or among other layers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from relflat_ext.core.usage import multiplication_layouts

VOCAB, DIM, SEQ = 7, 4, 3


class Tokens(nn.Module):
    """Tokens (n, SEQ) -> an embedding (or a bag of them) -> a tanh MLP over the sequence."""

    def __init__(self, bag: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.bag = bag
        self.embed = nn.EmbeddingBag(VOCAB, DIM, mode="sum") if bag else nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM if bag else SEQ * DIM, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(torch.tanh(self.mix(h if self.bag else h.flatten(1))))


class OneHot(nn.Module):
    """The same function on one-hot inputs (n, SEQ, VOCAB): an nn.Linear holding weight.T."""

    def __init__(self, tokens: Tokens):
        super().__init__()
        self.bag = tokens.bag
        self.lin = nn.Linear(VOCAB, DIM, bias=False)
        self.lin.weight.data = tokens.embed.weight.detach().T.clone()
        self.mix, self.head = tokens.mix, tokens.head

    def forward(self, one_hot):
        h = self.lin(one_hot.sum(1) if self.bag else one_hot)
        return self.head(torch.tanh(self.mix(h if self.bag else h.flatten(1))))


def _data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return tokens, F.one_hot(tokens, VOCAB).double(), torch.randint(0, 3, (n,), generator=g)


def test_an_embeddings_kappa_is_that_of_a_linear_layer_on_one_hot_tokens():
    tokens, one_hot, y = _data()
    model = Tokens().double()
    reference = rf.relative_flatness_autograd(OneHot(model), "lin", one_hot, y).kappa
    assert rf.relative_flatness_autograd(model, "embed", tokens, y).kappa == pytest.approx(reference, rel=1e-10)
    res = rf.relative_flatness(model, "embed", tokens, y, rel_tol=0.03, seed=0)
    assert res.method == "stochastic" and "embedding" in res.reason
    assert abs(res.kappa - reference) <= 4 * res.kappa_stderr
    by_parameter = rf.relative_flatness(model, "embed.weight", tokens, y, rel_tol=0.03, seed=1)
    assert abs(by_parameter.kappa - reference) <= 4 * by_parameter.kappa_stderr


@pytest.mark.parametrize("call", [
    lambda model, x, y: rf.relative_flatness(model, "embed", x, y, max_probes=4),
    lambda model, x, y: rf.relative_flatness_autograd(model, "embed", x, y),
    lambda model, x, y: rf.stochastic_estimate_layers(model, ["embed", "mix"], x, y, max_probes=4, sketch=0)])
def test_a_bag_of_embeddings_has_no_second_derivative_and_the_error_says_what_to_write(call):
    tokens, _, y = _data()
    model = Tokens(bag=True).double()
    with pytest.raises(NotImplementedError, match="_embedding_bag_backward") as info:
        call(model, tokens, y)
    assert "nn.Embedding followed by .sum" in "\n".join(info.value.__notes__)
    # the layers after it: their Hessians do not go through the bag's backward
    res = rf.relative_flatness(model, "mix", tokens, y, method="stochastic", max_probes=4)
    assert math.isfinite(res.kappa)


def test_an_embedding_among_the_layers_of_one_probe_set():
    tokens, one_hot, y = _data()
    model = Tokens().double()
    twin = OneHot(model)
    shared = rf.stochastic_estimate_layers(model, ["embed", "mix"], tokens, y, rel_tol=0.05, seed=0)
    for name, twin_name in (("embed", "lin"), ("mix", "mix")):
        reference = rf.relative_flatness_autograd(twin, twin_name, one_hot, y).kappa
        assert abs(shared[name].value - reference) <= 4 * shared[name].stderr, name


def test_feature_robustness_of_an_embedding_follows_theorem_5():
    tokens, one_hot, y = _data(n=64)
    model = Tokens().double()
    kappa = rf.relative_flatness_autograd(model, "embed", tokens, y).kappa
    fr = rf.feature_robustness(model, "embed", tokens, y, delta=1e-3, seed=0, n_samples=256, kappa=kappa)
    assert fr.m == VOCAB
    # E_F -> delta^2 / (2m) kappa as delta -> 0 (Theorem 5)
    assert fr.value == pytest.approx(fr.predicted, rel=0.1)


def test_lookups_are_seen_as_uses_of_the_columns():
    table = nn.Parameter(torch.randn(VOCAB, DIM))
    ids = torch.randint(0, VOCAB, (5, 2))
    assert multiplication_layouts({"t": table}, lambda: F.embedding(ids, table)) == {"t": "lookup"}
    assert multiplication_layouts({"t": table}, lambda: F.embedding_bag(ids, table)) == {"t": "lookup"}
    # a tied embedding: the output head multiplies the table's rows, and that is how it is seen
    tied = lambda: F.linear(torch.tanh(F.embedding(ids, table)), table)  # noqa: E731
    assert multiplication_layouts({"t": table}, tied) == {"t": "rows"}
    # a table looked up transposed: one_hot(x) @ W^T = (W one_hot(x))^T, its rows
    short = torch.randint(0, DIM, (5, 2))
    assert multiplication_layouts({"t": table}, lambda: F.embedding(short, table.T.contiguous())) == {"t": "rows"}


def test_the_profile_leaves_lookup_tables_out_unless_named():
    tokens, _, y = _data()
    model = Tokens().double()
    table = rf.profile(model, tokens, y, rel_tol=0.2, progress=False)
    assert [r["layer"] for r in table.rows] == ["mix", "head"]
    named = rf.profile(model, tokens, y, layers=["embed", "mix"], rel_tol=0.2, progress=False)
    assert [r["layer"] for r in named.rows] == ["embed", "mix"]
    assert named.rows[0]["shape"] == [VOCAB, DIM]


class Tied(nn.Module):
    """Tokens (n, SEQ) -> embedding -> tanh(mix) -> an output head sharing the table: logits per token."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def _kappa_of(model, x, y, transposed: bool):
    """kappa from the dense Hessian of the mean loss in W, the table being W^T (``transposed``) or W."""
    from relflat_ext.ops import dense_block_trace
    table = model.embed.weight.detach()
    w0 = (table.T if transposed else table).clone()

    def to_table(w):
        return w.T if transposed else w

    def risk(w):
        out = torch.func.functional_call(model, {"embed.weight": to_table(w)}, (x,))
        return F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
    hess = torch.autograd.functional.hessian(risk, w0)
    d, m = w0.shape
    return dense_block_trace(hess.reshape(d * m, d * m), w0)[0].item()


def test_a_tied_embedding_is_the_lookup_by_its_module_and_the_head_by_its_parameter():
    """Both uses count either way; named by the nn.Embedding module W is weight.T (the lookup),
    named as the parameter W is weight (the head's rows, as the model multiplies it)."""
    model = Tied().double()
    g = torch.Generator().manual_seed(3)
    tokens, targets = torch.randint(0, VOCAB, (20, SEQ), generator=g), torch.randint(0, VOCAB, (20, SEQ), generator=g)
    lookup = _kappa_of(model, tokens, targets, transposed=True)
    head = _kappa_of(model, tokens, targets, transposed=False)
    assert abs(lookup - head) > 0.1 * abs(head)  # two different numbers
    assert rf.relative_flatness_autograd(model, "embed", tokens, targets).kappa == pytest.approx(lookup, rel=1e-10)
    assert rf.relative_flatness_autograd(model, "embed.weight", tokens, targets).kappa == \
        pytest.approx(head, rel=1e-10)
    assert rf.relative_flatness_autograd(model, "head", tokens, targets).kappa == pytest.approx(head, rel=1e-10)
