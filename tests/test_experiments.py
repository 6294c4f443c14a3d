"""The reproduction CLI writes the JSON, plot and table each figure promises (tiny sizes)."""
import json

import pytest

from relflat_ext import experiments
from relflat_ext.cli import main as cli_main


def test_fig3_and_fig4_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "TEST_SAMPLES", 2000)
    for figure in ("fig3", "fig4"):
        result = experiments.run_synthetic(figure, (1.0, 4.0), datasets=4, n=60, seed=0)
        assert result["separation"] == [1.0, 4.0] and len(result["pearson"]) == 2 and len(result["kendall"]) == 2
        assert result["n_datasets"] == 4 and result["n_samples"] == 60
        rows = result["per_separation"][0]["rows"]
        assert all(r["gap"] == r["test_loss"] - r["train_loss"] for r in rows)
        if figure == "fig4":
            assert all(abs(r["bound"] - (r["representativeness"] + r["feature_robustness"])) < 1e-12 for r in rows)
        experiments.plot(result, str(tmp_path / f"{figure}.png"))
        assert (tmp_path / f"{figure}.png").stat().st_size > 1000
        assert "separation" in experiments.summary(result)


def test_reproduce_cli_writes_the_json(tmp_path, monkeypatch):
    real = experiments.run_synthetic
    monkeypatch.setattr(experiments, "TEST_SAMPLES", 500)
    monkeypatch.setattr(experiments, "run_synthetic",
                        lambda figure, separations, datasets, n, seed: real(figure, (2.0,), 3, 40, seed))
    assert cli_main(["reproduce", "fig3", "--quick", "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "fig3.json"))
    assert set(data) >= {"separation", "pearson", "kendall", "n_datasets", "n_samples"}
    assert (tmp_path / "fig3.png").exists()


def test_reparameterization_keeps_the_function_and_relative_flatness():
    import torch
    import relflat_ext as rf
    model = experiments._relu_mlp(16, 0).double()
    x = torch.randn(50, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (50,))
    other = experiments.reparameterize(model, seed=3)
    torch.testing.assert_close(other(x), model(x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(other[0].weight, model[0].weight)
    with torch.no_grad():
        model[2].weight[:, :3] = 0  # units feeding nothing downstream... and dead units upstream:
        model[2].weight[:4] = -model[2].weight[:4].abs() - 1  # never positive -> constant-zero features
        other = experiments.reparameterize(model, seed=3)
    for layer in ("2", "4"):
        for normalize in (False, True):
            assert rf.relative_flatness(other, layer, x.abs(), y, normalize_features=normalize).kappa == pytest.approx(
                rf.relative_flatness(model, layer, x.abs(), y, normalize_features=normalize).kappa, rel=1e-9)
    assert rf.measures.hessian_trace(other, "4", x, y) != pytest.approx(rf.measures.hessian_trace(model, "4", x, y),
                                                                        rel=1e-3)


def test_fig5_tiny_run():
    result = experiments.run_fig5(networks=3, epochs=(1,), seed=0)
    assert set(result["kendall"]) == set(experiments.FIG5_MEASURES) == set(result["kendall_reparameterized"])
    assert len(result["rows"]) == 3
    # Relative flatness is reparameterization invariant: identical values network by network.
    for r in result["rows"]:
        for m in ("relative_flatness", "relative_flatness_normalized"):
            assert r["measures_reparameterized"][m] == pytest.approx(r["measures"][m], rel=1e-4), m
    assert "relative_flatness" in experiments.summary_fig5(result)
