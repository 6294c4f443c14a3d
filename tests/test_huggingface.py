"""Hugging Face style models and data: dict batches with "labels", outputs with ``.logits``,
causal-LM label shifting, transformers' Conv1D, and tokens as samples where the tail is token-wise.
Small random configurations; nothing is downloaded."""
import math

import pytest
import torch
from torch import nn

import relflat_ext as rf

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()


def _gpt2(tied=True, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=23, n_positions=16, bos_token_id=0,
                                     eos_token_id=0, tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(config).double().eval()


def _bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=23, num_labels=3, max_position_embeddings=16)
    return transformers.BertForSequenceClassification(config).double().eval()


def _lm_batch(n=4, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 23, (n, seq), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored, as padding is
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _within(est, exact, k=4.0):
    assert abs(est.kappa - exact) <= k * est.kappa_stderr, (est.kappa, est.kappa_stderr, exact)


def test_gpt2_dict_batch_loss_is_the_models_own():
    from relflat_ext.flatness.problem import Problem
    model, batch = _gpt2(), _lm_batch()
    problem = Problem.build(model, "lm_head", batch)
    assert problem.labels == "causal"
    (x, y), = list(problem.batches())
    assert "labels" not in x
    with torch.no_grad():
        ours = problem.loss(problem.forward(x), y)
        theirs = model(**batch).loss
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)


def test_gpt2_untied_lm_head_exact_with_tokens_as_samples():
    model, batch = _gpt2(tied=False), _lm_batch()
    res = rf.relative_flatness(model, "lm_head", batch)
    base = rf.relative_flatness(model, "lm_head", batch, method="autograd")
    assert res.method == "closed_form" and "tokens as samples" in res.reason
    assert res.n == int((batch["labels"][:, 1:] != -100).sum())  # counted next-token targets
    torch.testing.assert_close(res.kappa, base.kappa, rtol=1e-10, atol=0)


def test_gpt2_tied_head_and_conv1d_projection_estimated_within_error_bars():
    model, batch = _gpt2(), _lm_batch()
    for layer in ("lm_head", "transformer.h.1.mlp.c_proj", "transformer.h.0.attn.c_attn"):
        res = rf.relative_flatness(model, layer, batch, seed=0, rel_tol=0.05, method="stochastic")
        base = rf.relative_flatness(model, layer, batch, method="autograd")
        _within(res, base.kappa)
    assert "tied" in rf.relative_flatness(model, "lm_head", batch, seed=0, max_probes=8).reason


def test_bert_classifier_dict_batch_closed_form_matches_baseline():
    model = _bert()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 23, (6, 7), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    res = rf.relative_flatness(model, "classifier", batch)
    base = rf.relative_flatness(model, "classifier", batch, method="autograd")
    assert res.method == "closed_form"
    torch.testing.assert_close(res.kappa, base.kappa, rtol=1e-10, atol=0)
    with torch.no_grad():  # the loss the measurement differentiates is the model's own
        from relflat_ext.flatness.problem import Problem
        problem = Problem.build(model, "classifier", batch)
        (x, y), = list(problem.batches())
        torch.testing.assert_close(problem.loss(problem.forward(x), y), model(**batch).loss)


def test_batches_are_weighted_by_counted_tokens():
    """Two dict batches with different numbers of ignored labels give the risk over all tokens."""
    model, batch = _gpt2(tied=False), _lm_batch(n=4)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    whole = rf.relative_flatness(model, "transformer.h.1.mlp.c_fc", batch, method="autograd")
    split = rf.relative_flatness(model, "transformer.h.1.mlp.c_fc", halves, method="autograd")
    torch.testing.assert_close(split.kappa, whole.kappa, rtol=1e-10, atol=0)
    exact = rf.relative_flatness(model, "lm_head", halves)
    torch.testing.assert_close(exact.kappa, rf.relative_flatness(model, "lm_head", batch).kappa, rtol=1e-10, atol=0)


class _EncoderLM(nn.Module):
    """Token classifier on nn.TransformerEncoder: the last layer's feed-forward block is followed
    by token-wise steps only (residual, LayerNorm, head); the first layer's by attention."""

    def __init__(self, vocab=17, width=8, classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


def test_last_mlp_block_exact_with_tokens_as_samples_and_attention_after_detected():
    torch.manual_seed(0)
    model = _EncoderLM().double()
    g = torch.Generator().manual_seed(3)
    tokens, labels = torch.randint(0, 17, (3, 6), generator=g), torch.randint(0, 5, (3, 6), generator=g)
    labels[1, 2] = -100
    res = rf.relative_flatness(model, "encoder.layers.1.linear2", tokens, labels, method="exact")
    base = rf.relative_flatness(model, "encoder.layers.1.linear2", tokens, labels, method="autograd")
    assert "tokens as samples" in res.reason
    torch.testing.assert_close(res.kappa, base.kappa, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="mixes tokens"):
        rf.relative_flatness(model, "encoder.layers.0.linear2", tokens, labels, method="exact")
    auto = rf.relative_flatness(model, "encoder.layers.0.linear2", tokens, labels, seed=0, rel_tol=0.05)
    assert auto.method == "stochastic"
    _within(auto, rf.relative_flatness(model, "encoder.layers.0.linear2", tokens, labels, method="autograd").kappa)


def test_dict_batch_errors_name_the_problem():
    model, batch = _gpt2(), _lm_batch()
    with pytest.raises(ValueError, match="without 'labels'"):
        rf.relative_flatness(model, "lm_head", {"input_ids": batch["input_ids"]})
    with pytest.raises(TypeError, match="under 'labels'"):
        rf.relative_flatness(model, "lm_head", batch, batch["labels"])
    with pytest.raises(ValueError, match="same number of samples"):
        rf.relative_flatness(model, "lm_head", {**batch, "attention_mask": batch["attention_mask"][:2]})


def test_profile_of_gpt2_from_dict_batches():
    model, batch = _gpt2(), _lm_batch()
    table = rf.profile(model, batch, max_probes=64, rel_tol=0.2, progress=False, hessian_trace=False)
    names = [r["layer"] for r in table.rows]
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" in names
    assert all(math.isfinite(r["kappa"]) and (r["method"] != "stochastic" or r["kappa_stderr"] > 0) for r in table.rows)


def test_float32_gpt2_head_in_tokens_matches_the_float64_baseline():
    """The model as users run it (float32, trained a little so the logits are confident) against the
    float64 full Hessian of the same weights."""
    model = _gpt2(tied=False).float().train()
    batch = _lm_batch(n=4, seq=9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    res = rf.relative_flatness(model, "lm_head", batch)
    assert res.method == "closed_form" and "tokens as samples" in res.reason
    base = rf.relative_flatness(model.double(), "lm_head", batch, method="autograd").kappa
    torch.testing.assert_close(res.kappa, base, rtol=1e-5, atol=0)


def _bart(seed=0):
    torch.manual_seed(seed)
    config = transformers.BartConfig(vocab_size=23, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=1,
                                     decoder_start_token_id=2, tie_word_embeddings=False)
    return transformers.BartForConditionalGeneration(config).double().eval()


def test_encoder_decoder_dict_batch_loss_is_the_models_own_and_its_head_exact():
    """An encoder-decoder model given only labels makes its decoder inputs from them, as its own
    loss does; the head is then exact with tokens as samples."""
    from relflat_ext.flatness.problem import Problem
    model = _bart()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(3, 23, (4, 6), generator=g)
    labels[0, 4:] = -100
    batch = {"input_ids": torch.randint(3, 23, (4, 9), generator=g), "labels": labels}
    problem = Problem.build(model, "lm_head", batch)
    (x, y), = list(problem.batches())
    assert problem.labels == "seq2seq" and "decoder_input_ids" in x and torch.equal(y, labels)
    with torch.no_grad():
        torch.testing.assert_close(problem.loss(problem.forward(x), y), model(**batch).loss, rtol=1e-12, atol=0)
    res = rf.relative_flatness(model, "lm_head", batch)
    assert "tokens as samples" in res.reason and res.n == int((labels != -100).sum())
    torch.testing.assert_close(res.kappa, rf.relative_flatness(model, "lm_head", batch, method="autograd").kappa,
                               rtol=1e-9, atol=0)


def test_feature_robustness_of_an_lm_head_counts_tokens_as_kappa_does():
    """Theorem 5 on a causal LM's head from dict batches: labels shifted, padding ignored, the
    mean over counted tokens on both sides (weighting by all positions would be 30/36 of kappa)."""
    model, batch = _gpt2(tied=False), _lm_batch()
    fr = rf.feature_robustness(model, "lm_head", batch, delta=1e-2, n_samples=200, seed=0)
    scale = fr.delta ** 2 / (2 * fr.m)
    assert fr.n == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(fr.value / scale - fr.kappa) <= 3 * fr.stderr / scale, (fr.value / scale, fr.stderr / scale, fr.kappa)


def test_generalization_tools_and_measures_take_dict_batches():
    model = _bert()
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 23, (30, 7), generator=g), torch.randint(0, 3, (30,), generator=g)
    batch = {"input_ids": ids, "labels": labels}

    class OnTensors(nn.Module):  # the same model called on a tensor, returning its logits
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids).logits
    plain = OnTensors()
    fr = rf.feature_robustness(model, "classifier", batch, delta=1e-2, n_samples=200, seed=0)
    scale = fr.delta ** 2 / (2 * fr.m)
    assert abs(fr.value / scale - fr.kappa) <= 3 * fr.stderr / scale
    rep = rf.representativeness(model, "classifier", batch, delta=0.1, folds=5, seed=0)
    same = rf.representativeness(plain, "inner.classifier", ids, labels, delta=0.1, folds=5, seed=0)
    assert rep.n == 30 and rep.value == pytest.approx(same.value, rel=1e-12, abs=1e-15)
    bound = rf.generalization_bound(model, "classifier", batch, delta=0.1, folds=5, seed=0)
    assert bound.bound == pytest.approx(rep.value + 0.1 ** 2 / (2 * fr.m) * fr.kappa, rel=1e-9)  # Rep + d^2/2m kappa
    fisher = rf.measures.fisher_rao_norm(model, batch, depth=3)
    assert fisher.norm_sq == pytest.approx(rf.measures.fisher_rao_norm(plain, ids, labels, depth=3).norm_sq, rel=1e-12)
    pac = rf.measures.pacbayes_flatness(model, batch, iterations=3, draws=2)
    assert pac.accuracy == pytest.approx(rf.measures.pacbayes_flatness(plain, ids, labels, iterations=3,
                                                                       draws=2).accuracy)


def test_pacbayes_accuracy_of_a_causal_lm_scores_the_next_tokens():
    model, batch = _gpt2(), _lm_batch()
    pac = rf.measures.pacbayes_flatness(model, batch, iterations=2, draws=2)
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)[:, :-1]
    target = batch["labels"][:, 1:]
    counted = target != -100
    assert pac.n == int(counted.sum())
    assert pac.accuracy == pytest.approx(float(((pred == target) & counted).sum()) / pac.n)


@pytest.mark.parametrize("layer", ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj",
                                   "transformer.h.1.attn.c_proj"])
def test_gpt2_conv1d_layers_of_the_last_block_are_exact(layer):
    """transformers' Conv1D (W stored transposed) on the exact paths: tokens as samples where no
    attention follows (the last block's MLP and attention output), against the full Hessian."""
    model, batch = _gpt2(tied=False), _lm_batch()
    res = rf.relative_flatness(model, layer, batch, lmax=True)
    base = rf.relative_flatness(model, layer, batch, lmax=True, method="autograd")
    assert res.method == "exact" and "tokens as samples" in res.reason
    torch.testing.assert_close(res.kappa, base.kappa, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(res.kappa_lmax, base.kappa_lmax, rtol=1e-9, atol=1e-15)
    normalized = rf.relative_flatness(model, layer, batch, normalize_features=True).kappa
    torch.testing.assert_close(normalized, rf.relative_flatness(model, layer, batch, normalize_features=True,
                                                                method="autograd").kappa, rtol=1e-9, atol=1e-15)
    trace = rf.measures.hessian_trace(model, layer, batch)  # from the block traces, in W's (d, m) frame
    assert trace == pytest.approx(float(torch.trace(rf.layer_hessian(model, layer, batch)[0])), rel=1e-9)
    assert rf.relative_flatness(model, "transformer.h.0.mlp.c_proj", batch, seed=0).method == "stochastic"


def _classifier(problem_type, num_labels, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=23, num_labels=num_labels, max_position_embeddings=16,
                                     problem_type=problem_type)
    return transformers.BertForSequenceClassification(config).double().eval()


def _kappa_of_the_models_own_loss(model, layer, batch):
    """Brute force: the full Hessian of ``model(**batch).loss`` in the layer's weight."""
    name = f"{layer}.weight"
    weight = dict(model.named_parameters())[name].detach()
    loss = lambda w: torch.func.functional_call(model, {name: w}, kwargs=batch).loss  # noqa: E731
    d, m = weight.shape
    h = torch.autograd.functional.hessian(loss, weight).reshape(d, m, d, m)
    return float((weight @ weight.T * torch.einsum("smtm->st", h)).sum())  # sum_st <w_s, w_t> Tr H_st


CLASSIFIER_TASKS = [  # (declared problem_type, num_labels, labels, the built-in loss that is the model's own)
    ("regression", 1, lambda g: torch.randn(6, generator=g, dtype=torch.float64), "mse"),
    (None, 1, lambda g: torch.randn(6, generator=g, dtype=torch.float64), "mse"),
    ("regression", 2, lambda g: torch.randn(6, 2, generator=g, dtype=torch.float64), "mse"),
    ("multi_label_classification", 3, lambda g: (torch.rand(6, 3, generator=g) > 0.5).double(), "bce_with_logits"),
    (None, 3, lambda g: (torch.rand(6, 3, generator=g) > 0.5).double(), "bce_with_logits"),
    (None, 3, lambda g: torch.randint(0, 3, (6,), generator=g), "cross_entropy"),
]


@pytest.mark.parametrize("problem_type, num_labels, make_labels, own", CLASSIFIER_TASKS)
def test_classifier_measured_with_its_own_loss(problem_type, num_labels, make_labels, own):
    """A classifier's problem_type (declared, or inferred as transformers infers it) picks the loss:
    MSE for regression, BCE with logits for multi-label; kappa agrees with the full Hessian of the
    model's own loss, and the reason says which loss ran."""
    from relflat_ext.flatness.problem import Problem
    model = _classifier(problem_type, num_labels)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 23, (6, 7), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": make_labels(g)}
    problem = Problem.build(model, "classifier", batch)
    assert problem.loss.name == own
    (x, y), = list(problem.batches())
    with torch.no_grad():
        torch.testing.assert_close(problem.loss(problem.forward(x), y), model(**batch).loss, rtol=1e-12, atol=0)
    res = rf.relative_flatness(model, "classifier", batch, block_trace=True)
    assert res.method == "closed_form"
    assert (f"loss {own}, the model's own" in res.reason) == (own != "cross_entropy"), res.reason
    brute = _kappa_of_the_models_own_loss(model, "classifier", batch)
    assert brute > 0
    torch.testing.assert_close(res.kappa, brute, rtol=1e-9, atol=0)
    robust = rf.feature_robustness(model, "classifier", batch, delta=1e-3, n_samples=8, seed=0)
    assert robust.kappa == res.kappa
    # A DataLoader-like list of such batches decides the same way from its first batch.
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    torch.testing.assert_close(rf.relative_flatness(model, "classifier", halves).kappa, res.kappa, rtol=1e-12, atol=0)


def test_explicit_loss_overrides_the_models_own_and_accuracy_measures_refuse_regression():
    model = _classifier("multi_label_classification", 3)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 23, (6, 7), generator=g)
    one_hot = torch.eye(3, dtype=torch.float64)[torch.randint(0, 3, (6,), generator=g)]
    batch = {"input_ids": ids, "labels": one_hot}
    own = rf.relative_flatness(model, "classifier", batch)
    asked = rf.relative_flatness(model, "classifier", batch, loss="cross_entropy")
    assert "bce_with_logits" in own.reason and "the model's own" not in asked.reason
    assert asked.kappa != own.kappa
    regressor = _classifier("regression", 1)
    batch = {"input_ids": ids, "labels": torch.randn(6, dtype=torch.float64)}
    with pytest.raises(ValueError, match="problem_type is 'regression'"):
        rf.measures.pacbayes_flatness(regressor, batch)
    assert rf.measures.fisher_rao_norm(regressor, batch).norm > 0


@pytest.mark.parametrize("problem_type, num_labels", [(None, 3), ("regression", 1)])
def test_regularizer_on_a_transformers_classifier(problem_type, num_labels):
    """The penalty reads the output object's .logits and the model's own loss: it equals kappa of
    the same batch, and its gradient reaches the classifier's weight."""
    model = _classifier(problem_type, num_labels)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 23, (6, 7), generator=g)
    labels = torch.randn(6, generator=g, dtype=torch.float64) if num_labels == 1 else torch.randint(0, 3, (6,))
    with rf.FlatnessRegularizer(model, "classifier") as reg:
        model(input_ids=ids)
        penalty = reg.penalty(labels)
        penalty.backward()
    kappa = rf.relative_flatness(model, "classifier", {"input_ids": ids, "labels": labels}).kappa
    torch.testing.assert_close(penalty.item(), kappa, rtol=1e-10, atol=0)
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0


def test_a_tokenized_datasets_columns_as_a_dataloader_yields_them():
    """A DataLoader over a tokenized dataset yields its columns: the targets under "label" (which
    transformers' collators rename to "labels"), the raw text and an index beside the model's
    inputs. The labels are found and the other columns dropped, as the Trainer drops them."""
    model = _classifier(None, 3)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 23, (6, 7), generator=g)
    labels = torch.randint(0, 3, (6,), generator=g)
    clean = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    columns = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "label": labels, "idx": torch.arange(6),
               "text": ["some text"] * 6}
    expected = rf.relative_flatness(model, "classifier", clean).kappa
    assert rf.relative_flatness(model, "classifier", [columns]).kappa == expected
    assert rf.feature_robustness(model, "bert.pooler.dense", [columns], n_samples=4, seed=0, kappa=1.0).value == \
        rf.feature_robustness(model, "bert.pooler.dense", [clean], n_samples=4, seed=0, kappa=1.0).value

    class Plain(nn.Module):  # a forward without **kwargs gets only what it names
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(23, 4), nn.Linear(4, 3)

        def forward(self, input_ids):
            return self.head(self.embed(input_ids).mean(1))

    plain = Plain().double()
    assert rf.relative_flatness(plain, "head", [{**columns, "label_ids": labels}]).kappa == \
        rf.relative_flatness(plain, "head", ids, labels).kappa


def test_tuple_outputs_of_return_dict_false_models():
    """``return_dict=False``: a transformers model returns a tuple whose first entry is the logits
    (no labels are passed): measured, regularized and perturbed as the output object would be."""
    model = _classifier(None, 3)
    tuple_model = _classifier(None, 3)
    tuple_model.config.return_dict = False
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 23, (6, 7), generator=g)
    batch = {"input_ids": ids, "labels": torch.randint(0, 3, (6,), generator=g)}
    assert isinstance(tuple_model(input_ids=ids), tuple)
    expected = rf.relative_flatness(model, "classifier", batch).kappa
    assert rf.relative_flatness(tuple_model, "classifier", batch).kappa == expected
    with rf.FlatnessRegularizer(tuple_model, "classifier") as reg:
        tuple_model(input_ids=ids)
        torch.testing.assert_close(reg.penalty(batch["labels"]).item(), expected, rtol=1e-12, atol=0)
    assert rf.feature_robustness(tuple_model, "bert.pooler.dense.weight", batch, n_samples=4, seed=0,
                                 kappa=1.0).value == \
        rf.feature_robustness(model, "bert.pooler.dense.weight", batch, n_samples=4, seed=0, kappa=1.0).value
