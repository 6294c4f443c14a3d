"""The multiplicative-probe estimator: unbiased for kappa_Tr (and Tr(H)), on Linear, sequence and
convolutional layers, against exact values."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import relflat_ext as rf
from relflat_ext import stochastic_estimate
from models import assert_unchanged, data, mlp, snapshot, train_to_minimum


@pytest.mark.parametrize("seed, layer, loss", [(0, "0", "cross_entropy"), (1, "2", "cross_entropy"),
                                                (2, "2", "mse"), (3, "4", "cross_entropy")])
def test_stochastic_agrees_with_exact_on_linear_layers(seed, layer, loss):
    model = mlp([6, 8, 7, 4], "tanh", seed=seed)
    x, y = data(120, 6, 4, loss, seed=seed)
    exact = rf.relative_flatness(model, layer, x, y, loss=loss).kappa
    est = rf.relative_flatness(model, layer, x, y, loss=loss, method="stochastic", rel_tol=0.03, seed=seed)
    assert est.method == "stochastic" and est.probes >= 32 and est.kappa_stderr > 0
    assert abs(est.kappa - exact) <= 3 * est.kappa_stderr, (est.kappa, est.kappa_stderr, exact)


def test_estimator_is_unbiased_over_independent_runs():
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(80, 6, 4, "cross_entropy", seed=0)
    exact = rf.relative_flatness(model, "2", x, y).kappa
    runs = torch.tensor([stochastic_estimate(model, "2", x, y, max_probes=8, probes_per_round=8, seed=s).value
                         for s in range(60)])
    assert abs(runs.mean().item() - exact) <= 3 * runs.std().item() / math.sqrt(60)


def test_stops_at_rel_tol_and_reports_it():
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(80, 6, 4, "cross_entropy", seed=0)
    loose = stochastic_estimate(model, "2", x, y, rel_tol=0.5, max_probes=1000, seed=0)
    assert loose.converged and loose.probes == 32 and loose.stderr <= 0.5 * loose.value
    capped = stochastic_estimate(model, "2", x, y, rel_tol=1e-6, max_probes=40, probes_per_round=16, seed=0)
    assert not capped.converged and capped.probes == 40


def test_hessian_trace_estimate_matches_the_dense_hessian():
    model = mlp([6, 8, 7, 4], "tanh", seed=1)
    x, y = data(60, 6, 4, "cross_entropy", seed=1)
    trace = torch.trace(rf.layer_hessian(model, "2", x, y)[0]).item()
    est = stochastic_estimate(model, "2", x, y, quantity="hessian_trace", rel_tol=0.02, seed=1)
    assert abs(est.value - trace) <= 3 * est.stderr


def test_normalized_variant_matches_theorem4_exact():
    model = mlp([6, 8, 7, 4], "tanh", seed=2)
    x, y = data(100, 6, 4, "cross_entropy", seed=2)
    exact = rf.relative_flatness(model, "2", x, y, normalize_features=True).kappa
    est = rf.relative_flatness(model, "2", x, y, method="stochastic", normalize_features=True, rel_tol=0.03, seed=2)
    assert abs(est.kappa - exact) <= 3 * est.kappa_stderr


class TokenModel(nn.Module):
    """A Linear layer applied to every token of a sequence, then mean pooling."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x (n, T, 5)
        return self.head(torch.tanh(self.proj(x)).mean(1))


def _kappa_from_dense_hessian(model, weight, view_matrix, x, y):
    """Exact kappa = <W W^T, T> from the dense Hessian of the mean loss in the weight."""
    w0 = weight.detach().clone()
    name = [k for k, p in model.named_parameters() if p is weight][0]

    def risk(w):
        return nn.functional.cross_entropy(torch.func.functional_call(model, {name: w}, (x,)), y)
    hess = torch.autograd.functional.hessian(risk, w0)
    mat = view_matrix(w0)
    d, m = mat.shape
    return rf.ops.dense_block_trace(hess.reshape(d * m, d * m), mat)[0].item()


def test_sequence_inputs_go_stochastic_under_auto_and_agree_with_the_dense_hessian():
    model = TokenModel().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 7, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    exact = _kappa_from_dense_hessian(model, model.proj.weight, lambda w: w, x, y)
    res = rf.relative_flatness(model, "proj", x, y, rel_tol=0.03, seed=0)
    assert res.method == "stochastic" and "not one feature vector per sample" in res.reason
    assert abs(res.kappa - exact) <= 3 * res.kappa_stderr
    with pytest.raises(ValueError, match="stochastic"):
        rf.relative_flatness(model, "proj", x, y, method="exact")


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d, (30, 2, 9)), (nn.Conv2d, (30, 2, 6, 6))])
def test_convolutions_agree_with_the_dense_hessian(conv, shape):
    torch.manual_seed(1)  # before the layers are built: their weights must not depend on test order
    model = nn.Sequential(conv(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(4)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 4, (shape[0],), generator=g)
    model(x)  # materialize the lazy layer
    exact = _kappa_from_dense_hessian(model, model[0].weight, lambda w: w.reshape(w.shape[0], -1), x, y)
    before = snapshot(model)
    res = rf.relative_flatness(model, "0", x, y, rel_tol=0.03, seed=1)
    assert_unchanged(model, before)
    assert res.method == "stochastic" and "not nn.Linear" in res.reason
    assert abs(res.kappa - exact) <= 3 * res.kappa_stderr, (res.kappa, res.kappa_stderr, exact)
    baseline = rf.relative_flatness_autograd(model, "0", x, y, lmax=True)  # the authors' method, W as (out, patch)
    torch.testing.assert_close(baseline.kappa, exact, rtol=1e-10, atol=0)
    assert baseline.kappa_lmax is not None and rf.relative_flatness(model, "0", x, y, method="autograd").kappa == \
        baseline.kappa
    with pytest.raises(ValueError, match="normalize_features"):
        rf.relative_flatness_autograd(model, "0", x, y, normalize_features=True)


@pytest.mark.parametrize("dims, groups", [(1, 1), (2, 1), (2, 2)])
def test_transposed_convolutions_agree_with_the_feature_mixing_hessian(dims, groups):
    """A transposed convolution's features are its input's channel vectors (per group): kappa_Tr =
    Tr of the Hessian w.r.t. A of the loss with every group's input channels mixed by A, at A = I
    (sum over E_ab of D^2 E(W)[W E_ab, W E_ab]). Computed without the package's weight view, so a
    wrong view (rows, groups, the (in, out/groups) weight layout) fails here."""
    from torch.func import hessian
    conv, transposed = [(nn.Conv1d, nn.ConvTranspose1d), (nn.Conv2d, nn.ConvTranspose2d)][dims - 1]
    torch.manual_seed(dims + groups)
    model = nn.Sequential(conv(2, 4, 3), nn.Tanh(), transposed(4, 6, 3, stride=2, groups=groups), nn.Tanh(),
                          nn.Flatten(), nn.LazyLinear(3)).double()
    g = torch.Generator().manual_seed(groups)
    x = torch.randn(20, 2, *{1: (9,), 2: (6, 6)}[dims], generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    model(x)  # materialize the lazy layer
    m = 4 // groups

    def mixed_loss(a):
        h = model[:2](x).unflatten(1, (groups, m))
        return nn.functional.cross_entropy(model[2:](torch.einsum("ab,ngb...->nga...", a, h).flatten(1, 2)), y)
    exact = hessian(mixed_loss)(torch.eye(m, dtype=torch.float64)).reshape(m * m, m * m).trace().item()
    # The view itself: one input position's channel vector v comes out as (W_group v) per group.
    layer, v = model[2], torch.randn(1, 4, *[1] * dims, generator=g, dtype=torch.float64)
    view = rf.core.layers.matrix_view(layer, "2")
    conv_transpose = [nn.functional.conv_transpose1d, nn.functional.conv_transpose2d][dims - 1]
    scattered = conv_transpose(v, layer.weight, groups=groups)  # (1, out, *kernel): no overlap from one position
    per_group = view.to_matrix(layer.weight).reshape(groups, -1, m) @ v.reshape(groups, m, 1)
    torch.testing.assert_close(per_group.flatten(), scattered.flatten(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(view.from_matrix(view.to_matrix(layer.weight)), layer.weight, rtol=0, atol=0)
    before = snapshot(model)
    res = rf.relative_flatness(model, "2", x, y, rel_tol=0.03, seed=0)
    assert_unchanged(model, before)
    assert res.method == "stochastic"
    assert abs(res.kappa - exact) <= 3 * res.kappa_stderr, (res.kappa, res.kappa_stderr, exact)
    assert "2" in rf.core.layers.weight_layers(model)  # profiled by default
    torch.testing.assert_close(rf.relative_flatness_autograd(model, "2", x, y).kappa, exact, rtol=1e-10, atol=0)


def test_auto_keeps_the_exact_paths_for_linear_layers_and_says_why():
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(30, 6, 4, "cross_entropy")
    assert rf.relative_flatness(model, "4", x, y).reason.startswith("closed_form")
    assert rf.relative_flatness(model, "2", x, y).reason.startswith("exact")


def test_auto_goes_stochastic_when_the_exact_path_needs_more_hvps_than_max_probes():
    """Only where the exact path needs Hessian-vector products (a LayerNorm in the tail): closed
    forms and the chain rule stay exact at any width (test_flatness)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 30), nn.LayerNorm(30), nn.Linear(30, 4)).double()
    x, y = data(50, 6, 4, "cross_entropy")
    res = rf.relative_flatness(model, "2", x, y, max_probes=16, rel_tol=0.5, seed=0)
    assert res.method == "stochastic" and "30 Hessian-vector products" in res.reason
    assert rf.relative_flatness(model, "2", x, y, max_probes=64).method == "exact"


def test_custom_weight_view():
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(60, 6, 4, "cross_entropy")
    view = rf.WeightView(lambda w: w, lambda mat: mat)  # what Linear uses, passed explicitly
    a = stochastic_estimate(model, "2", x, y, seed=3, max_probes=64, weight_view=view)
    b = stochastic_estimate(model, "2", x, y, seed=3, max_probes=64)
    assert a.value == pytest.approx(b.value, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [(dict(rel_tol=0.0), "rel_tol"), (dict(max_probes=1), "max_probes"),
                                           (dict(quantity="fisher"), "quantity"),
                                           (dict(probes_per_round=1), "probes_per_round")])
def test_bad_arguments(kwargs, match):
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(10, 6, 4, "cross_entropy")
    with pytest.raises(ValueError, match=match):
        stochastic_estimate(model, "2", x, y, **kwargs)
    with pytest.raises(TypeError, match="no weight"):
        stochastic_estimate(model, "1", x, y)


@pytest.mark.parametrize("d, m", [(7, 3), (3, 7), (5, 5)])
def test_probe_factor_reproduces_the_columns_covariance(d, m):
    """F F^T = W W^T with F (d, min(d, m)): the probes F A have the columns' covariance of W A, from
    fewer random numbers when m > d; a rank-deficient W (a pruned row) included."""
    from relflat_ext.flatness.stochastic import probe_factor
    g = torch.Generator().manual_seed(d * m)
    w = torch.randn(d, m, generator=g, dtype=torch.float64)
    w[0] = 0
    f = probe_factor(w)
    assert f.shape == (d, min(d, m))
    torch.testing.assert_close(f @ f.T, w @ w.T, rtol=1e-12, atol=1e-12)


def test_square_root_factor_at_a_confident_float32_minimum():
    """Where users measure: a convolution (d = 4 < m = 18, the square-root factor's path) of a
    network trained to a confident minimum, estimated in float32, against the dense float64 Hessian;
    the shared probes' weight-space quadratic forms too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 2, 6, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    train_to_minimum(model, x, y, steps=400, lr=1e-2).zero_grad(set_to_none=True)
    exact_model = copy.deepcopy(model).double()
    exact = _kappa_from_dense_hessian(exact_model, exact_model[0].weight, lambda w: w.reshape(4, -1), x.double(), y)
    est = stochastic_estimate(model, "0", x, y, rel_tol=0.03, max_probes=2000, seed=0)
    assert est.converged and abs(est.value - exact) <= 4 * est.stderr, (est.value, est.stderr, exact)
    shared = rf.stochastic_estimate_layers(model, ["0", "3"], x, y, rel_tol=0.03, max_probes=2000, seed=0)["0"]
    assert abs(shared.value - exact) <= 4 * shared.stderr + 1e-6 * abs(exact), (shared.value, shared.stderr, exact)


def test_lmax_asked_of_an_estimated_layer_is_said_to_be_missing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double()
    x, y = torch.randn(8, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.warns(RuntimeWarning, match="lmax asked, but layer '0' is estimated"):
        res = rf.relative_flatness(model, "0", x, y, lmax=True, rel_tol=0.5, seed=0)
    assert res.method == "stochastic" and res.kappa_lmax is None
    with pytest.warns(RuntimeWarning, match="block_trace asked, but layer '0' is estimated.*block_trace is None"):
        res = rf.relative_flatness(model, "0", x, y, block_trace=True, rel_tol=0.5, seed=0)  # was silent
    assert res.block_trace is None
    with pytest.warns(RuntimeWarning, match="lmax and block_trace asked.*kappa_lmax and block_trace are None"):
        rf.relative_flatness(model, "0", x, y, lmax=True, block_trace=True, rel_tol=0.5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the profile asks block traces of every layer: no warning for those
        rf.profile(model, x, y, rel_tol=0.5, max_probes=64, progress=False)


def test_a_layer_some_batches_skip_is_measured_over_the_batches_that_use_it():
    """A mixture-of-experts router: each batch goes through one expert, so the loss of some batches
    does not reach an expert's weight. That is no error: those batches add zero curvature."""
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(5, 4) for _ in range(2))

        def forward(self, x):
            return self.experts[int(x[0, 0] > 0)](torch.tanh(x))

    torch.manual_seed(0)
    model = Routed().double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 4, (40,))
    x[:20, 0], x[20:, 0] = x[:20, 0].abs() + 0.1, -x[20:, 0].abs() - 0.1  # batch 0: expert 1; batch 1: expert 0
    for name in ("experts.0", "experts.1"):
        exact = rf.relative_flatness_autograd(model, name, x, y, batch_size=20).kappa
        est = rf.relative_flatness(model, name, x, y, batch_size=20, method="stochastic", rel_tol=0.05, seed=0)
        assert abs(est.kappa - exact) <= 4 * est.kappa_stderr
        shared = rf.stochastic_estimate_layers(model, ["experts.0", "experts.1"], x, y, batch_size=20, seed=0)[name]
        assert abs(shared.value - exact) <= 4 * shared.stderr + 1e-9 * exact


class _WideInput(nn.Module):
    """A first weight used as ``x @ W`` (stored (in, out), so its matrix view is a transpose) on
    inputs wide enough for hashed probe columns, then a tanh and a Linear head."""

    def __init__(self, m, hidden=3, classes=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(m, hidden) / math.sqrt(m))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.w))


def test_wide_layers_hash_their_probe_columns_and_stay_unbiased():
    """m >= 4 * HASHED_COLUMNS: probe coordinates P hash their m columns into HASHED_COLUMNS
    Gaussian ones (column j = sign_j * z[:, bucket_j]), so F P costs d r c flops. E[P_aj P_bk] =
    [a=b][j=k] still holds, so the per-layer and the shared (deflated) estimators stay unbiased:
    within 4 standard errors of the full Hessian's kappa, through a transposed weight view."""
    from relflat_ext.flatness.stochastic import HASHED_COLUMNS, ProbeDraw
    m = 4 * HASHED_COLUMNS
    gen = torch.Generator().manual_seed(0)
    draw = ProbeDraw.draw(3, 5, m, gen, torch.float64, "cpu")
    assert draw.z.shape == (3, 5, HASHED_COLUMNS)
    coords = draw.coordinates()
    expected = draw.z.gather(2, draw.buckets[:, None, :].expand(-1, 5, -1)) * draw.signs[:, None, :]
    torch.testing.assert_close(coords, expected, rtol=0, atol=0)
    factor = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    buffer = torch.empty(3, 7, m, dtype=torch.float64)
    assert draw.mapped(factor, out=buffer) is buffer
    torch.testing.assert_close(buffer, factor @ coords, rtol=1e-12, atol=1e-12)
    assert ProbeDraw.draw(3, 5, m - 1, gen, torch.float64, "cpu").buckets is None  # narrower: dense

    torch.manual_seed(0)
    model = _WideInput(m).double()
    x, y = torch.randn(30, m, dtype=torch.float64), torch.randint(0, 4, (30,))
    exact = rf.relative_flatness_autograd(model, "w", x, y).kappa
    one = rf.stochastic_estimate(model, "w", x, y, rel_tol=0.03, seed=0)
    assert abs(one.value - exact) <= 4 * one.stderr, (one.value, one.stderr, exact)
    shared = rf.stochastic_estimate_layers(model, ["w", "head"], x, y, rel_tol=0.03, max_probes=600, sketch=4,
                                           seed=0)["w"]
    assert abs(shared.value - exact) <= 4 * shared.stderr, (shared.value, shared.stderr, exact)


def test_deflated_shared_probe_directions_equal_the_dense_computation(monkeypatch):
    """The shared estimator's residual directions R (I - Q Q^T) g, computed as R g - (R Q)(Q^T g)
    from hashed draws into reused buffers, equal the plain dense computation from the same draws,
    for a transposed weight view (x @ W), a wide Linear, a narrow one and one with m <= d and
    hashed columns, whose directions stay coordinates (formed on demand)."""
    from relflat_ext.core.layers import matrix_view
    from relflat_ext.flatness.joint import _ProbeSpace
    from relflat_ext.flatness import stochastic
    from relflat_ext.flatness.stochastic import ProbeDraw
    monkeypatch.setattr(stochastic, "HASHED_COLUMNS", 8)  # hashed columns on small layers
    torch.manual_seed(0)
    m = 4 * 8
    model = nn.Sequential(nn.Linear(m, 6), nn.Linear(6, 3), nn.Linear(m, m + 1)).double()
    wide = _WideInput(m).double()
    layers = [(wide, "w"), (model[0], "0"), (model[1], "1"), (model[2], "2")]
    transposed = rf.core.layers.ParameterLayer(wide.w)
    transposed.layout = "columns"  # x @ W, as the first batch would show
    views = [transposed.view("w")] + [matrix_view(mod, name) for mod, name in layers[1:]]
    weights = [mod.w if name == "w" else mod.weight for mod, name in layers]
    space = _ProbeSpace([w.detach() for w in weights], views, "kappa")
    assert space.layouts == [None, None, None, "rows"] and space.shapes[3] == (m, m)
    basis = torch.linalg.qr(torch.randn(space.dim, 5, dtype=torch.float64)).Q.T
    for rounds in range(2):  # the second round reuses the buffers
        seed = 10 + rounds
        directions = space.residual_directions(4, torch.Generator().manual_seed(seed), basis,
                                               space.to_matrices(basis, mapped_only=True))
        assert directions.weights[3] is None and directions.coordinates[3].shape == (4, m, m)
        got = [directions.weight(l) for l in range(len(weights))]
        gen = torch.Generator().manual_seed(seed)
        draws = [ProbeDraw.draw(4, r, mm, gen, torch.float64, "cpu") for r, mm in space.shapes]
        g = torch.cat([d.coordinates().flatten(1) for d in draws], dim=1)
        want = space.to_weights(g - (g @ basis.T) @ basis)
        assert [tuple(t.shape[1:]) for t in got] == [tuple(w.shape) for w in weights]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_directions_of_weights_stored_transposed_are_built_contiguous():
    """A weight that holds W^T (an embedding, a matrix used as x @ W, transformers' Conv1D) gets its
    probe directions built as (F P)^T, rows gathered: the same matrices as F P, contiguous in the
    weight's layout (a strided copy of each cost more than its Hessian-vector product)."""
    from relflat_ext.core.layers import WeightView, matrix_view
    from relflat_ext.flatness.stochastic import (HASHED_COLUMNS, ProbeDraw, _directions, probe_factor,
                                                 stores_transposed)
    plain = [matrix_view(nn.Linear(5, 3), "a"), matrix_view(nn.Conv2d(2, 3, 3), "b")]
    flipped = [matrix_view(nn.Embedding(5, 3), "c"), WeightView(lambda w: w.T, lambda mat: mat.T)]
    assert [stores_transposed(v, 3, 5) for v in plain + flipped] == [False, False, True, True]
    assert not stores_transposed(WeightView(lambda w: w.T, lambda mat: mat.T.clone()), 3, 5)  # a copy: no view
    gen = torch.Generator().manual_seed(0)
    factor = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    for m in (7, 4 * HASHED_COLUMNS):  # dense and hashed columns
        draw = ProbeDraw.draw(3, 4, m, gen, torch.float64, "cpu")
        buffer = torch.empty(3, m, 6, dtype=torch.float64)
        mats = draw.mapped(factor, out=buffer, transposed=True)
        assert mats.shape == (3, 6, m) and mats.transpose(1, 2).data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(mats, draw.mapped(factor), rtol=1e-12, atol=1e-12)
    embedding = nn.Embedding(4 * HASHED_COLUMNS, 6).double()
    view = matrix_view(embedding, "e")
    w_mat = view.to_matrix(embedding.weight.detach())  # (6, 2048)
    factor = probe_factor(w_mat)
    dirs = _directions("kappa", w_mat, factor, view, 3, torch.Generator().manual_seed(1), None)
    assert dirs.shape == (3, *embedding.weight.shape) and dirs.is_contiguous()
    draw = ProbeDraw.draw(3, 6, w_mat.shape[1], torch.Generator().manual_seed(1), torch.float64, "cpu")
    want = torch.stack([view.from_matrix(mat) for mat in draw.mapped(factor)])
    torch.testing.assert_close(dirs, want, rtol=1e-12, atol=1e-12)


def test_rounds_hold_fewer_probes_where_their_directions_would_not_fit(monkeypatch):
    """A round's directions are capped in bytes (ROUND_BYTES: an embedding of a large vocabulary
    would hold 32 copies of itself), at least 2 a round, and the estimates stay unbiased."""
    from relflat_ext.flatness import joint, stochastic
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(80, 6, 4, "cross_entropy", seed=0)
    exact = rf.relative_flatness(model, "2", x, y).kappa
    weight_bytes = model[2].weight.numel() * model[2].weight.element_size()
    sizes = []
    forms = stochastic._quadratic_forms
    monkeypatch.setattr(stochastic, "ROUND_BYTES", 3 * weight_bytes)
    monkeypatch.setattr(stochastic, "_quadratic_forms",
                        lambda p, w, x, y, d, *rest: sizes.append(d.count) or forms(p, w, x, y, d, *rest))
    est = stochastic_estimate(model, "2", x, y, rel_tol=0.05, max_probes=600, seed=0)
    assert set(sizes[:-1]) == {3} and sizes[-1] <= 3 and est.probes == sum(sizes)
    assert abs(est.value - exact) <= 4 * est.stderr
    sizes.clear()
    quadratic_forms = joint._Operator.quadratic_forms
    monkeypatch.setattr(joint, "ROUND_BYTES", 1)  # below one probe: 2 a round
    monkeypatch.setattr(joint._Operator, "quadratic_forms",
                        lambda self, dirs: sizes.append(dirs.count) or quadratic_forms(self, dirs))
    shared = rf.stochastic_estimate_layers(model, ["0", "2"], x, y, sketch=0, max_probes=10, rel_tol=1e-9, seed=0)
    assert sizes == [2] * 5 and shared["2"].probes == 10


@pytest.mark.parametrize("batched, block_bytes", [(False, 1 << 30), (True, 1 << 30), (True, 1)])
def test_quadratic_forms_equal_those_of_the_stacked_products(batched, block_bytes):
    """<v, H v> reduced product by product (the per-probe path), in one vmap'd pass (GPUs), or in
    blocks of one: the same numbers as the products stacked first."""
    from relflat_ext.core.hvp import hessian_quadratic_forms, hessian_vector_products
    model = mlp([6, 8, 7, 4], "tanh", seed=0)
    x, y = data(40, 6, 4, "cross_entropy", seed=0)
    weight = model[2].weight
    grad = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), weight, create_graph=True)[0]
    vectors = torch.randn(5, *weight.shape, dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
    want = (hessian_vector_products(grad, weight, vectors, batched=False) * vectors).flatten(1).sum(1)
    got = hessian_quadratic_forms(grad, weight, vectors, batched=batched, block_bytes=block_bytes)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want.double(), rtol=1e-12, atol=1e-12)
