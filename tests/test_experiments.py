"""The reproduction CLI writes the JSON, plot and table each figure promises (tiny sizes)."""
import json

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
