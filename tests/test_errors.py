"""Bad input gets a clear error naming the argument; the model is never changed, even then."""
import pytest
import torch
from torch import nn

import relflat_ext as rf
from models import assert_unchanged, data, mlp, snapshot


def _poisoned(model):
    """A copy of the model whose head weight holds a NaN (the original stays untouched)."""
    import copy
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[2].weight[0, 0] = float("nan")
    return bad


def _setup():
    model = mlp([5, 6, 4], "tanh", seed=0)
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)  # a stale grad the user keeps
    x, y = data(20, 5, 4, "cross_entropy")
    return model, x, y


BAD_CALLS = [
    ("layer not in model", lambda m, x, y: rf.relative_flatness(m, "7", x, y), ValueError, "not in the model"),
    ("foreign module", lambda m, x, y: rf.relative_flatness(m, nn.Linear(5, 6), x, y), ValueError, "not a submodule"),
    ("layer without weight", lambda m, x, y: rf.relative_flatness(m, "1", x, y), TypeError, "no weight parameter"),
    ("unsupported loss", lambda m, x, y: rf.relative_flatness(m, "2", x, y, loss="hinge"), ValueError, "loss must be"),
    ("unknown method", lambda m, x, y: rf.relative_flatness(m, "2", x, y, method="fast"), ValueError, "method must be"),
    ("empty data", lambda m, x, y: rf.relative_flatness(m, "2", x[:0], y[:0]), ValueError, "empty"),
    ("empty loader", lambda m, x, y: rf.relative_flatness(m, "2", []), ValueError, "empty"),
    ("NaN inputs", lambda m, x, y: rf.relative_flatness(m, "2", x * float("nan"), y), ValueError, "NaN or Inf"),
    ("Inf inputs", lambda m, x, y: rf.relative_flatness(m, "0", x.index_fill(0, torch.tensor([3]), float("inf")), y),
     ValueError, "NaN or Inf"),
    ("mismatched targets", lambda m, x, y: rf.relative_flatness(m, "2", x, y[:5]), ValueError, "targets has 5"),
    ("class out of range", lambda m, x, y: rf.relative_flatness(m, "2", x, y + 10), ValueError, r"\[0, 4\)"),
    ("mse target shape", lambda m, x, y: rf.relative_flatness(m, "2", x, y, loss="mse"), ValueError, "shape"),
    ("mse target shape, exact", lambda m, x, y: rf.relative_flatness(m, "0", x, y, loss="mse"), ValueError, "shape"),
    ("missing targets", lambda m, x, y: rf.relative_flatness(m, "2", x), TypeError, "targets must be a tensor"),
    ("bad batch_size", lambda m, x, y: rf.relative_flatness(m, "2", x, y, batch_size=0), ValueError, "batch_size"),
    ("closed form on hidden layer", lambda m, x, y: rf.relative_flatness(m, "0", x, y, method="closed_form"),
     ValueError, "produce the model output"),
    ("Hessian too large", lambda m, x, y: rf.relative_flatness_autograd(m, "0", x, y, max_hessian_bytes=100),
     ValueError, "max_hessian_bytes"),
    ("finite but too large", lambda m, x, y: rf.relative_flatness(m.float(), "0", x.float() * 1e20, y),
     ValueError, "too large for torch.float32"),
    ("NaN in the weights", lambda m, x, y: rf.relative_flatness(_poisoned(m), "2", x, y), ValueError,
     r"2\.weight contains NaN"),
    ("a Dataset of single samples", lambda m, x, y: rf.relative_flatness(m, "2", torch.utils.data.TensorDataset(x, y)),
     TypeError, "DataLoader"),
    ("dict batch the forward cannot take", lambda m, x, y: rf.relative_flatness(m, "0", {"image": x, "labels": y}),
     ValueError, r"Sequential.forward .* no \['input'\]"),
    ("a bias Parameter as the layer", lambda m, x, y: rf.relative_flatness(m, m[0].bias, x, y), ValueError,
     "'0.bias' is a parameter of shape"),
    ("a foreign Parameter as the layer", lambda m, x, y: rf.relative_flatness(m, nn.Parameter(torch.ones(2, 2)), x, y),
     ValueError, "not a parameter of the model"),
    ("wrong input width", lambda m, x, y: rf.relative_flatness(m, "2", x[:, :3], y), RuntimeError, "shapes cannot be multiplied"),
]


@pytest.mark.parametrize("what, call, exc, match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_and_model_unchanged(what, call, exc, match):
    model, x, y = _setup()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        call(model, x, y)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["auto", "exact", "autograd"])
def test_successful_calls_leave_model_unchanged(method):
    model, x, y = _setup()
    model[2].weight.requires_grad_(False)  # a frozen layer stays frozen
    before = snapshot(model)
    for layer in ("0", "2"):
        rf.relative_flatness(model, layer, x, y, method=method, lmax=True, normalize_features=True)
    assert_unchanged(model, before)


def test_sequence_inputs_need_the_stochastic_path():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 3)

        def forward(self, x):
            return self.proj(x).mean(1)

    model = Tokens().double()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    before = snapshot(model)
    with pytest.raises(ValueError, match="2-D per-sample features.*method='stochastic'"):
        rf.relative_flatness(model, "proj", x, y, method="exact")
    assert_unchanged(model, before)
    assert rf.relative_flatness(model, "proj", x, y, max_probes=64).method == "stochastic"  # auto
    assert_unchanged(model, before)


def test_layer_called_twice_is_rejected_by_the_exact_paths_and_estimated_by_auto():
    lin = nn.Linear(4, 4).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    x, y = data(8, 4, 4, "cross_entropy")
    with pytest.raises(ValueError, match="tied weights"):
        rf.relative_flatness(model, "0", x, y, method="exact")
    res = rf.relative_flatness(model, "0", x, y, rel_tol=0.2, seed=0)
    assert res.method == "stochastic" and "tied weights" in res.reason


def test_from_features_errors():
    f, w = torch.randn(10, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rf.relative_flatness_from_features(f * float("nan"), w, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        rf.relative_flatness_from_features(f[:0], w, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be"):
        rf.relative_flatness_from_features(f, torch.randn(3, 5), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="rows summing to 1"):
        rf.relative_flatness_from_features(f, w, torch.rand(10, 3))


class _SkipsInEval(nn.Module):
    """An auxiliary head the forward uses in training only (as torchvision's Inception and GoogLeNet
    do), and a layer it runs under torch.no_grad()."""

    def __init__(self, freeze: bool = True):
        super().__init__()
        self.freeze = freeze
        self.frozen = nn.Linear(5, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)
        self.aux = nn.Linear(6, 4)

    def forward(self, x):
        with torch.set_grad_enabled(not self.freeze):
            x = torch.tanh(self.frozen(x))
        h = torch.tanh(self.body(x))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


UNREACHED_CALLS = {
    "stochastic": lambda m, x, y, layer: rf.relative_flatness(m, layer, x, y, method="stochastic"),
    "autograd": lambda m, x, y, layer: rf.relative_flatness_autograd(m, layer, x, y),
    "shared": lambda m, x, y, layer: rf.stochastic_estimate_layers(m, ["body", layer], x, y),
    "shared without sketch": lambda m, x, y, layer: rf.stochastic_estimate_layers(m, ["body", layer], x, y, sketch=0),
    "auto": lambda m, x, y, layer: rf.relative_flatness(m, layer, x, y),
}


@pytest.mark.parametrize("call", UNREACHED_CALLS)
@pytest.mark.parametrize("layer", ["aux", "frozen"])
def test_a_weight_the_loss_does_not_reach_gets_an_error_naming_it(call, layer):
    """Before: torch's "element 0 of tensors does not require grad", or, with shared probes, a kappa
    of exactly 0 with no error bar. The exact path needs no graph to the weight, only the features,
    so ``auto`` measures the layer run under no_grad (the loss is a function of its weight all
    the same)."""
    model = _SkipsInEval().double()
    x, y = data(20, 5, 4, "cross_entropy")
    before = snapshot(model)
    if (layer, call) == ("frozen", "auto"):
        exact = rf.relative_flatness(model, layer, x, y)
        unfrozen = _SkipsInEval(freeze=False).double()
        unfrozen.load_state_dict(model.state_dict())
        assert exact.method == "exact"
        assert exact.kappa == pytest.approx(rf.relative_flatness_autograd(unfrozen, layer, x, y).kappa, rel=1e-10)
    else:
        with pytest.raises(ValueError, match=f"'{layer}' through autograd.*use_reentrant=False"):
            UNREACHED_CALLS[call](model, x, y, layer)
    assert_unchanged(model, before)


class _Detached(nn.Module):
    """A layer whose output the forward detaches (a stop-gradient branch)."""

    def __init__(self):
        super().__init__()
        self.cut = nn.Linear(5, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.cut(x)).detach())


@pytest.mark.parametrize("method", ["auto", "exact"])
def test_a_layer_whose_output_is_detached_gets_the_same_error_on_the_exact_path(method):
    """Before: torch's "element 0 of tensors does not require grad" from the exact path's products."""
    model = _Detached().double()
    x, y = data(20, 5, 4, "cross_entropy")
    with pytest.raises(ValueError, match="'cut' through autograd.*after .detach"):
        rf.relative_flatness(model, "cut", x, y, method=method)
    assert rf.relative_flatness(model, "head", x, y).kappa > 0


def test_the_profile_marks_a_layer_the_loss_does_not_reach_and_measures_the_others():
    model = _SkipsInEval().double()
    x, y = data(40, 5, 4, "cross_entropy")
    for probes in ("per_layer", "shared"):
        rows = {r["layer"]: r for r in rf.profile(model, x, y, probes=probes, progress=False, rel_tol=0.2).rows}
        assert rows["aux"]["method"] == "unused" and rows["aux"]["kappa"] is None
        for name in ("body", "head"):
            assert rows[name]["kappa"] == pytest.approx(rf.relative_flatness(model, name, x, y).kappa, rel=1e-9)


def test_a_weight_parameter_given_as_the_layer_is_its_module():
    model, x, y = _setup()
    for k in ("0", "2"):
        by_parameter = rf.relative_flatness(model, model[int(k)].weight, x, y)
        by_name = rf.relative_flatness(model, k, x, y)
        assert (by_parameter.kappa, by_parameter.method, by_parameter.layer) == (by_name.kappa, by_name.method, k)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 5), nn.Linear(2, 5), nn.Linear(10, 3)

    def forward(self, left, right):
        return self.head(torch.tanh(torch.cat([self.a(left), self.b(right)], 1)))


def test_a_model_of_two_inputs_fed_a_dataset_of_three_tensors_is_told_how_to_batch():
    """TensorDataset(left, right, y) yields (left, right, y): taken as (x, y) it would make `right`
    the targets; the model's call fails and the error names the forward's inputs and the dict
    batch that feeds them. Extra entries beside (x, y) are ignored with a warning; dict batches
    give the same kappa as a hand-written call."""
    torch.manual_seed(0)
    model = _TwoInputs().double()
    left, right, y = torch.randn(20, 3).double(), torch.randn(20, 2).double(), torch.randint(0, 3, (20,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(left, right, y), batch_size=10)
    with pytest.warns(RuntimeWarning, match="3 entries"), \
            pytest.raises(TypeError, match=r"_TwoInputs.forward takes 2 inputs \(left, right\).*'left': \.\.\."):
        rf.relative_flatness(model, "a", loader)
    batches = [{"left": left, "right": right, "labels": y}]
    exact = rf.relative_flatness(model, "a", batches)
    assert exact.method == "exact"
    torch.testing.assert_close(exact.kappa, rf.relative_flatness_autograd(model, "a", batches).kappa,
                               rtol=1e-10, atol=0)
    x, y1 = data(20, 4, 3, "cross_entropy")
    plain = mlp([4, 6, 3])
    with pytest.warns(RuntimeWarning, match="3 entries"):  # (x, y, index): the index ignored
        res = rf.relative_flatness(plain, "0", [(x, y1, torch.arange(20))])
    assert res.kappa == rf.relative_flatness(plain, "0", x, y1).kappa


class _LogOfNegative(nn.Module):
    """A forward that computes NaN from finite inputs and weights (log of a negative)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.log(torch.tanh(self.body(x))))


NAN_FORWARD_CALLS = {
    "exact": lambda m, x, y: rf.relative_flatness(m, "body", x, y, method="exact"),
    "closed form": lambda m, x, y: rf.relative_flatness(m, "head", x, y),
    "stochastic": lambda m, x, y: rf.relative_flatness(m, "body", x, y, method="stochastic", seed=0),
    "autograd": lambda m, x, y: rf.relative_flatness_autograd(m, "body", x, y),
    "shared probes": lambda m, x, y: rf.stochastic_estimate_layers(m, ["body", "head"], x, y, seed=0),
    "feature robustness": lambda m, x, y: rf.feature_robustness(m, "head", x, y, seed=0),
    "representativeness": lambda m, x, y: rf.representativeness(m, "head", x, y, folds=2, seed=0),
    "Fisher-Rao norm": lambda m, x, y: rf.measures.fisher_rao_norm(m, x, y),
    "PAC-Bayes flatness": lambda m, x, y: rf.measures.pacbayes_flatness(m, x, y, draws=2, iterations=2),
}


@pytest.mark.parametrize("call", NAN_FORWARD_CALLS)
def test_a_forward_that_computes_nan_is_named_on_every_path(call):
    """Before: NaN from the estimator and the baseline, "the inputs are too large for float32" from
    the exact paths, a raw "atol must be >= 0" from feature robustness, the kernel's "key_scale must
    be finite" from representativeness, NaN from the Fisher-Rao norm, and a PAC-Bayes sigma from the
    argmax of NaN outputs."""
    model = _LogOfNegative().double()
    x, y = data(20, 5, 4, "cross_entropy")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or Inf on batch 0 of the data"):
        NAN_FORWARD_CALLS[call](model, x, y)
    assert_unchanged(model, before)
    model.head.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="(head.weight|weight of 'head') contains NaN"):
        NAN_FORWARD_CALLS[call](model, x, y)
    model = _LogOfNegative().double()
    model.body.weight.data[0, 0] = float("nan")  # m = 5 < d = 6 here; a wide one below
    with pytest.raises(ValueError, match="(body.weight|weight of 'body') contains NaN"):
        NAN_FORWARD_CALLS[call](model, x, y)


def test_the_estimator_names_a_nan_weight_before_factoring_it():
    """Before: LinAlgError from the eigendecomposition of W W^T (m > d)."""
    model = nn.Sequential(nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    model[0].weight.data[0, 0] = float("nan")
    x, y = data(10, 8, 2, "cross_entropy")
    with pytest.raises(ValueError, match="weight of '0' contains NaN"):
        rf.relative_flatness(model, "0", x, y, method="stochastic")
