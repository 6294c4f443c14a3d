"""Models as users wrap them. Parametrized weights (torch.nn.utils.parametrize: weight_norm,
spectral_norm, ...), pruned weights and the older hook-based weight_norm / spectral_norm are
measured as the weights they compute, on a copy, and the user's model keeps its parametrizations,
masks and hooks; a torch.compile'd model is measured by its modules' own names; a
(Distributed)DataParallel model as the module inside."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import relflat_ext as rf
from models import assert_unchanged, snapshot


def _models(seed=0):
    """A model with weight_norm on its first layer and spectral_norm on its head, and the plain
    model with the weights they compute."""
    torch.manual_seed(seed)
    param = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    parametrizations.weight_norm(param[0])
    parametrizations.spectral_norm(param[2])
    param.eval()  # spectral_norm's power iteration runs in training mode only
    plain = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for k in (0, 2):
            plain[k].weight.copy_(param[k].weight)
            plain[k].bias.copy_(param[k].bias)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(80, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (80,), generator=g)
    return param, plain.eval(), x, y


@pytest.mark.parametrize("layer, method", [("0", "exact"), ("0", "autograd"), ("2", "closed_form"),
                                           ("2", "autograd")])
def test_parametrized_weights_are_measured_as_the_weights_they_compute(layer, method):
    param, plain, x, y = _models()
    before = snapshot(param)
    res = rf.relative_flatness(param, layer, x, y, method=method)
    assert_unchanged(param, before)
    assert parametrize.is_parametrized(param[int(layer)], "weight")  # still parametrized, weight still computed
    expected = rf.relative_flatness(plain, layer, x, y, method=method).kappa
    assert res.kappa == pytest.approx(expected, rel=1e-12)
    assert "parametrized or pruned weights folded" in res.reason


def test_stochastic_shared_probes_and_profile_on_parametrized_weights():
    param, plain, x, y = _models(seed=1)
    before = snapshot(param)
    exact = {name: rf.relative_flatness(plain, name, x, y).kappa for name in ("0", "2")}
    est = rf.stochastic_estimate(param, "0", x, y, rel_tol=0.03, seed=0)
    assert abs(est.value - exact["0"]) <= 4 * est.stderr
    joint = rf.stochastic_estimate_layers(param, ["0", "2"], x, y, rel_tol=0.03, max_probes=400, seed=0)
    for name, e in joint.items():
        assert abs(e.value - exact[name]) <= 4 * e.stderr + 1e-12, (name, e.value, e.stderr, exact[name])
    table = rf.profile(param, x, y, progress=False)
    assert [row["kappa"] for row in table.rows] == pytest.approx([exact["0"], exact["2"]], rel=1e-12)
    assert_unchanged(param, before)
    # the generated classes still carry their weight property: the parametrizations can still be removed
    for k in (0, 2):
        parametrize.remove_parametrizations(param[k], "weight")
        torch.testing.assert_close(param[k].weight, plain[k].weight, rtol=1e-12, atol=1e-14)


def test_a_copy_of_the_model_is_not_broken_either():
    """The folding must not touch what deep copies share (the generated class)."""
    param, _, x, y = _models(seed=2)
    other = copy.deepcopy(param)
    rf.relative_flatness(param, "0", x, y)
    assert other[0].weight.shape == (8, 6)


def test_the_regularizer_differentiates_through_the_parametrization():
    param, plain, x, y = _models(seed=3)
    reg = rf.FlatnessRegularizer(param, "2")
    param(x)
    penalty = reg.penalty(y)
    penalty.backward()
    reg.remove()
    originals = [p for n, p in param.named_parameters() if n.startswith("2.parametrizations.weight.original")]
    assert originals and all(p.grad is not None and p.grad.abs().sum() > 0 for p in originals)
    assert penalty.item() == pytest.approx(rf.relative_flatness(plain, "2", x, y).kappa, rel=1e-10)


def _prune(model):
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[2], "weight", amount=0.3)
    return "weight_orig"


def _old_weight_norm(model):
    for k in (0, 2):
        nn.utils.weight_norm(model[k])
    return "weight_g"


def _old_spectral_norm(model):
    for k in (0, 2):
        nn.utils.spectral_norm(model[k])
    return "weight_orig"


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("derive", [_prune, _old_weight_norm, _old_spectral_norm])
def test_hook_computed_weights_are_measured_as_the_matrices_they_compute(derive):
    """torch.nn.utils.prune (``weight = weight_orig * weight_mask``) and the older hook-based
    weight_norm / spectral_norm recompute ``weight`` in a forward pre-hook (no Parameter, and a
    non-leaf tensor that deepcopy refuses): measured as that matrix on a copy, every path; the
    model keeps its hooks; the regularizer's gradient reaches the tensors the weight comes from."""
    _, plain, x, y = _models(seed=6)
    pruned = copy.deepcopy(plain)
    source = derive(pruned)
    pruned.eval()(x)  # the weights as measured: spectral_norm iterates only in training mode
    with torch.no_grad():
        for k in (0, 2):
            plain[k].weight.copy_(pruned[k].weight)
    before = snapshot(pruned)
    for layer, method in (("0", "exact"), ("0", "autograd"), ("2", "closed_form")):
        res = rf.relative_flatness(pruned, layer, x, y, method=method)
        assert res.kappa == pytest.approx(rf.relative_flatness(plain, layer, x, y, method=method).kappa, rel=1e-12)
    est = rf.relative_flatness(pruned, "0", x, y, method="stochastic", rel_tol=0.5, seed=0)
    assert est.kappa == pytest.approx(rf.relative_flatness(plain, "0", x, y, method="stochastic", rel_tol=0.5,
                                                           seed=0).kappa, rel=1e-10)
    assert [r["layer"] for r in rf.profile(pruned, x, y, progress=False).rows] == ["0", "2"]
    assert_unchanged(pruned, before)
    assert all(pruned[k]._forward_pre_hooks and not isinstance(pruned[k].weight, nn.Parameter) for k in (0, 2))
    reg = rf.FlatnessRegularizer(pruned, "2")
    pruned(x)
    reg.penalty(y).backward()
    reg.remove()
    grad = getattr(pruned[2], source).grad
    assert grad is not None and grad.abs().sum() > 0
    if derive is _prune:
        assert bool((grad[pruned[2].weight_mask == 0] == 0).all())  # no gradient through a pruned entry


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_model_is_measured_by_its_modules_names(backend):
    """torch.compile wraps the model (its modules become "_orig_mod.<name>"): the plain names work,
    and the values are the eager model's. With the backends users compile with (inductor, and
    aot_eager here, which is quick to compile), the compiled graph has no double backward: the
    module inside is measured. Before: "torch.compile with aot_autograd does not currently support
    double backward" from the estimator, the autograd baseline and every Hessian-vector product."""
    _, plain, x, y = _models(seed=4)
    compiled = torch.compile(plain, backend=backend)
    compiled(x)
    assert rf.relative_flatness_autograd(compiled, "0", x, y).kappa == pytest.approx(
        rf.relative_flatness_autograd(plain, "0", x, y).kappa, rel=1e-12)
    for name in ("0", "2", "_orig_mod.2"):
        got = rf.relative_flatness(compiled, name, x, y).kappa
        assert got == pytest.approx(rf.relative_flatness(plain, name.replace("_orig_mod.", ""), x, y).kappa,
                                    rel=1e-12)
    est = rf.relative_flatness(compiled, "0", x, y, method="stochastic", rel_tol=0.5, seed=0)
    assert est.kappa == pytest.approx(rf.relative_flatness(plain, "0", x, y, method="stochastic", rel_tol=0.5,
                                                           seed=0).kappa, rel=1e-10)


def test_feature_robustness_through_the_weight_of_a_compiled_model():
    """Perturbing a compiled model's convolution through its weight runs the module inside the
    wrapper (the wrapper would recompile for every new weight): the eager model's values."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)).double()
    x, y = torch.randn(12, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    compiled = torch.compile(plain, backend="eager")
    got = rf.feature_robustness(compiled, "0", x, y, delta=0.1, n_samples=8, seed=0, kappa=1.0)
    want = rf.feature_robustness(plain, "0", x, y, delta=0.1, n_samples=8, seed=0, kappa=1.0)
    torch.testing.assert_close(got.samples, want.samples, rtol=1e-12, atol=0)


def test_a_data_parallel_model_is_measured_as_its_module():
    """DataParallel (and DistributedDataParallel) add gradient synchronization, not function: the
    module inside is measured, by its plain names or the wrapper's ("module.<name>"), on the same
    paths (the chain rule here, not Hessian-vector products through the wrapper)."""
    _, plain, x, y = _models(seed=5)
    wrapped = nn.DataParallel(plain)  # on a CPU-only machine it only calls the module
    before = snapshot(wrapped)
    for name in ("0", "module.0", "2", "module.2"):
        got, want = rf.relative_flatness(wrapped, name, x, y), rf.relative_flatness(plain, name[-1], x, y)
        assert (got.kappa, got.method, got.layer) == (want.kappa, want.method, want.layer)
    assert rf.relative_flatness(wrapped, "0", x, y).reason.startswith("exact: second derivatives")
    assert [r["layer"] for r in rf.profile(wrapped, x, y, progress=False).rows] == ["0", "2"]
    robustness = [rf.feature_robustness(m, "0", x, y, seed=0).value for m in (wrapped, plain)]
    assert robustness[0] == robustness[1]
    assert_unchanged(wrapped, before)
