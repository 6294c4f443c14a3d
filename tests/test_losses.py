"""The loss table: every record's pieces agree with autograd on the function it names."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from relflat_ext.core.losses import LOSSES, CallableLoss, DiagonalHessian, SoftmaxHessian, get_loss

N, D = 6, 4
# torch.func.hessian goes through torch.jit internally, which warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _data(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    if name == "cross_entropy":
        y = torch.randint(0, D, (N,), generator=g)
    elif name == "mse":
        y = torch.randn(N, D, generator=g, dtype=torch.float64)
    else:
        y = torch.rand(N, D, generator=g, dtype=torch.float64).round()
    return z, y


def _dense(hessian):
    if isinstance(hessian, SoftmaxHessian):
        return torch.diag_embed(hessian.p) - hessian.p[:, :, None] * hessian.p[:, None, :]
    assert isinstance(hessian, DiagonalHessian)
    return torch.diag_embed(hessian.values)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_output_hessian_is_the_per_sample_hessian(name):
    loss = LOSSES[name]
    z, y = _data(name)
    # E = mean_i l_i, so l_i = N * E restricted to sample i: the Hessian of N * loss in z_i
    want = torch.stack([torch.func.hessian(lambda zi: N * loss(torch.cat([z[:i], zi[None], z[i + 1:]]), y))(z[i])
                        for i in range(N)])
    torch.testing.assert_close(_dense(loss.output_hessian(z)), want)
    torch.testing.assert_close(loss.output_hessian_diagonal(z), want.diagonal(dim1=1, dim2=2))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_per_sample_losses_statistics_and_derivatives(name):
    loss = LOSSES[name]
    z, y = _data(name, seed=1)
    per = loss.per_sample(z, y)
    torch.testing.assert_close(per.mean(), loss(z, y))
    # The statistics of one prediction, weighted by 1, give its loss at any label.
    torch.testing.assert_close(loss.loss_from_statistics(loss.statistics(z), y), per)
    leaf = z.clone().requires_grad_(True)
    grad = torch.autograd.grad(loss.for_derivatives(leaf, y), leaf, create_graph=True)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(loss(leaf, y), leaf)[0])
    v = torch.randn_like(z)
    hvp = torch.autograd.grad(grad, leaf, v)[0]
    torch.testing.assert_close(hvp * N, (_dense(loss.output_hessian(z)) @ v[:, :, None])[..., 0])


def test_get_loss():
    assert get_loss("mse") is LOSSES["mse"]
    custom = get_loss(lambda out, y: (out - y).abs().mean())
    assert isinstance(custom, CallableLoss) and not custom.builtin and custom.output_hessian(torch.zeros(2, 2)) is None
    with pytest.raises(ValueError, match="loss must be one of"):
        get_loss("hinge")


def test_torchs_own_losses_are_the_built_ins_and_others_stay_callables():
    """torch's loss functions and modules with the built-ins' arguments get the built-in record
    (closed forms, kernels, representativeness); weighted, smoothed or otherwise changed ones stay
    callables; a sum reduction (kappa n times too large) is refused."""
    for fn, name in ((F.cross_entropy, "cross_entropy"), (nn.CrossEntropyLoss(), "cross_entropy"),
                     (F.mse_loss, "mse"), (nn.MSELoss(), "mse"),
                     (F.binary_cross_entropy_with_logits, "bce_with_logits"),
                     (nn.BCEWithLogitsLoss(), "bce_with_logits")):
        assert get_loss(fn) is LOSSES[name], fn
    for fn in (nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss(weight=torch.ones(3)),
               nn.CrossEntropyLoss(ignore_index=0), nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), nn.NLLLoss(),
               F.nll_loss, nn.L1Loss()):
        assert isinstance(get_loss(fn), CallableLoss), fn
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match=f"reduction={reduction!r}"):
            get_loss(nn.MSELoss(reduction=reduction))


def test_a_loss_module_gets_the_closed_form_and_the_same_kappa():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 4, (30,))
    named = rf.relative_flatness(model, "2", x, y, loss="cross_entropy")
    module = rf.relative_flatness(model, "2", x, y, loss=nn.CrossEntropyLoss())
    assert module.method == "closed_form" and module.kappa == named.kappa
    callable_ = rf.relative_flatness(model, "2", x, y, loss=lambda out, t: F.cross_entropy(out, t))
    assert callable_.method == "exact"
    torch.testing.assert_close(callable_.kappa, named.kappa, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["exact", "stochastic"])
def test_nll_loss_of_raw_scores_is_flagged(method):
    """nll_loss of a model that returns logits, not log-probabilities, is linear in them: the output
    layer's kappa is then exactly 0, a user's slip that deserves a word; log_softmax outputs pass
    silently."""
    import warnings
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 4, (30,))
    with pytest.warns(RuntimeWarning, match="not log-probabilities"):
        res = rf.relative_flatness(model, "2", x, y, loss=nn.NLLLoss(), method=method, max_probes=8, rel_tol=1e-9)
    assert abs(res.kappa) < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf.relative_flatness(nn.Sequential(model, nn.LogSoftmax(1)), "0.2", x, y, loss=F.nll_loss, method=method,
                             max_probes=8, rel_tol=1e-9)


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="exception notes: Python 3.11+")
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # torch, on out["logits"]
def test_a_loss_written_for_the_output_object_is_told_it_gets_the_logits():
    """A model returning {"logits": ...} passes the logits to a callable loss (as to the built-in
    ones); a loss that indexes the dict fails inside torch, and the error carries a note saying so."""
    class DictOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.head(x)}
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises((IndexError, KeyError, TypeError)) as info:
        rf.relative_flatness(DictOutput(), "head", x, y, loss=lambda out, t: F.cross_entropy(out["logits"], t))
    assert "the loss gets those logits" in " ".join(getattr(info.value, "__notes__", [])), info.value
    ok = rf.relative_flatness(DictOutput(), "head", x, y, loss=lambda logits, t: F.cross_entropy(logits, t))
    assert ok.kappa > 0


def test_a_callable_loss_summed_over_the_samples_is_refused():
    """reduction='sum' made every kappa n times too large, without a word: the batch given twice
    doubles a sum and keeps a mean, which the first batch checks (no extra forward pass)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    summed = lambda out, t: F.cross_entropy(out, t, reduction="sum")  # noqa: E731
    for call in (lambda: rf.relative_flatness(model, "0", x, y, loss=summed),
                 lambda: rf.relative_flatness(model, "0", x, y, loss=summed, method="stochastic", max_probes=4),
                 lambda: rf.feature_robustness(model, "0", x, y, loss=summed, n_samples=4)):
        with pytest.raises(ValueError, match="sum over the samples"):
            call()
    reg = rf.FlatnessRegularizer(model, "0", loss=summed)
    model(x)
    with pytest.raises(ValueError, match="sum over the samples"):
        reg.penalty(y)
    reg.remove()
    mean = rf.relative_flatness(model, "0", x, y, loss=lambda out, t: F.cross_entropy(out, t)).kappa
    assert mean == pytest.approx(rf.relative_flatness(model, "0", x, y).kappa, rel=1e-10)
