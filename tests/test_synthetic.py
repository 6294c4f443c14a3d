"""The paper's synthetic data: exact invertibility, f(x) = psi(z), the mixture's geometry."""
import pytest
import torch

import relflat_ext as rf
from relflat_ext.datasets.synthetic import SyntheticTask, make_dataset


@pytest.mark.parametrize("dim", [2, 5])
def test_inputs_map_exactly_to_features(dim):
    task = SyntheticTask(2.0, dim=dim, seed=3)
    z, y = task.sample_features(300, torch.Generator().manual_seed(0))
    x = task.phi.inverse(z)
    torch.testing.assert_close(task.phi(x), z, rtol=0, atol=1e-12)
    psi = task.fit_classifier(z, y)
    torch.testing.assert_close(task.model(psi)(x), psi(z), rtol=0, atol=1e-12)


def test_feature_map_is_well_conditioned():
    task = SyntheticTask(1.0, dim=4, seed=0)
    for lin in [m for m in task.phi if isinstance(m, torch.nn.Linear)]:
        s = torch.linalg.svdvals(lin.weight)
        assert s.min() >= 0.8 - 1e-12 and s.max() <= 1.25 + 1e-12


def test_separation_controls_how_separable_the_classes_are():
    accs = []
    for sep in (0.0, 2.0, 6.0):
        task, model, x, y = make_dataset(sep, n=400, seed=1)
        xt, yt = task.sample(4000, torch.Generator().manual_seed(9))
        with torch.no_grad():
            accs.append((model(xt).argmax(1) == yt).double().mean().item())
    assert accs[0] < 0.6 and accs[0] < accs[1] < accs[2] and accs[2] > 0.99


def test_fresh_samples_follow_the_mixture():
    task = SyntheticTask(4.0, seed=0)
    z, y = task.sample_features(40000, torch.Generator().manual_seed(1))
    assert abs(y.double().mean().item() - 0.5) < 0.01
    for c in (0, 1):
        assert z[y == c, 0].mean().item() == pytest.approx((2 * c - 1) * 2.0, abs=0.05)


def test_relative_flatness_of_psi_runs_on_the_task():
    task, model, x, y = make_dataset(3.0, n=200, seed=2)
    res = rf.relative_flatness(model, "psi", x, y)
    assert res.method == "closed_form" and res.kappa > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="separation"):
        SyntheticTask(-1.0)
    with pytest.raises(ValueError, match="dim"):
        SyntheticTask(1.0, dim=1)
