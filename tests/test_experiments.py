"""The reproduction CLI writes the JSON, plot and table each figure promises (tiny sizes)."""
import json

import pytest
import torch

from relflat_ext.apps import reproduce as experiments
from relflat_ext.apps.zoo import lenet5
from relflat_ext.apps.cli import main as cli_main


def test_fig3_and_fig4_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "TEST_SAMPLES", 2000)
    for figure in ("fig3", "fig4"):
        result = experiments.run_synthetic(figure, (1.0, 4.0), datasets=4, n=60, seed=0)
        assert result["separation"] == [1.0, 4.0] and len(result["pearson"]) == 2 and len(result["kendall"]) == 2
        for key in ("pearson", "kendall"):  # intervals beside the estimates
            assert all(-1 <= lo <= hi <= 1 for lo, hi in result[f"{key}_ci"])  # 4 data sets: defined, ordered
        rob = result["per_separation"][0]["robustness"]
        assert set(rob) == {"error_gap", "normalized_kappa", "kappa_vs_weight_norm_sq", "gap_vs_weight_norm_sq",
                            "kappa_gap_given_weight_norm_sq"}
        assert result["n_datasets"] == 4 and result["n_samples"] == 60
        rows = result["per_separation"][0]["rows"]
        assert all(r["gap"] == r["test_loss"] - r["train_loss"] for r in rows)
        if figure == "fig4":
            assert all(abs(r["bound"] - (r["representativeness"] + r["feature_robustness"])) < 1e-12 for r in rows)
            assert set(result["per_separation"][0]["bound_vs_gap"]) == {"pearson", "kendall", "pearson_ci", "kendall_ci"}
        experiments.plot(result, str(tmp_path / f"{figure}.png"))
        assert (tmp_path / f"{figure}.png").stat().st_size > 1000
        assert "separation" in experiments.summary(result)


def test_fig3_quick_end_to_end(tmp_path):
    """`relflat reproduce fig3 --quick` as CI runs it."""
    import matplotlib.image
    assert cli_main(["reproduce", "fig3", "--quick", "--out", str(tmp_path), "--device", "cpu", "--seed", "1"]) == 0
    data = json.load(open(tmp_path / "fig3.json"))
    assert data["n_datasets"] == 20 and data["n_samples"] == 500 and len(data["pearson"]) == len(data["separation"])
    assert all(-1 <= v <= 1 for v in data["pearson"] + data["kendall"])
    image = matplotlib.image.imread(str(tmp_path / "fig3.png"))
    assert image.shape[0] > 100 and image.std() > 0


def test_reproduce_cli_writes_the_json(tmp_path, monkeypatch):
    real = experiments.run_synthetic
    monkeypatch.setattr(experiments, "TEST_SAMPLES", 500)
    monkeypatch.setattr(experiments, "run_synthetic",
                        lambda figure, separations, datasets, n, seed, device: real(figure, (2.0,), 3, 40, seed))
    assert cli_main(["reproduce", "fig3", "--quick", "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "fig3.json"))
    assert set(data) >= {"separation", "pearson", "kendall", "n_datasets", "n_samples"}
    assert (tmp_path / "fig3.png").exists()


def test_reparameterization_keeps_the_function_and_relative_flatness():
    import torch
    import relflat_ext as rf
    torch.manual_seed(0)
    model = lenet5(activation="relu").double().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (60,), generator=g)
    other = experiments.reparameterize(model, seed=3)
    torch.testing.assert_close(other(x), model(x), rtol=1e-10, atol=1e-12)
    layer = experiments.FIG5_LAYER
    for normalize in (False, True):
        assert rf.relative_flatness(other, layer, x, y, normalize_features=normalize).kappa == pytest.approx(
            rf.relative_flatness(model, layer, x, y, normalize_features=normalize).kappa, rel=1e-8)
    trace = rf.measures.hessian_trace(model, layer, x, y)
    assert rf.measures.hessian_trace(other, layer, x, y) != pytest.approx(trace, rel=1e-2)
    last = dict(other.named_modules())[layer]
    assert rf.measures.weight_norm(last) != pytest.approx(rf.measures.weight_norm(dict(model.named_modules())[layer]),
                                                          rel=1e-2)


def test_fig5_quick_end_to_end(tmp_path):
    """`relflat reproduce fig5 --quick` as CI runs it: minima found, JSON and PNG written, cache reused."""
    import matplotlib.image
    assert cli_main(["reproduce", "fig5", "--quick", "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "fig5.json"))
    assert data["n_minima"] == 6 and set(data["measures"]) == set(experiments.FIG5_MEASURES)
    for v in data["measures"].values():
        assert set(v) == {f"{k}{s}" for k in ("pearson", "kendall", "pearson_ci", "kendall_ci")
                          for s in ("", "_reparam")}
        assert v["kendall_ci"][0] <= v["kendall"] <= v["kendall_ci"][1]
    for r in data["rows"]:  # reparameterization invariance, network by network
        for m in ("relative_flatness", "relative_flatness_normalized"):
            assert r["measures_reparam"][m] == pytest.approx(r["measures"][m], rel=1e-8)
        assert r["train_loss"] < experiments.LOSS_THRESHOLD
    image = matplotlib.image.imread(str(tmp_path / "fig5.png"))
    assert image.shape[0] > 100 and image.std() > 0  # a drawn figure, not a blank
    again = experiments.run_fig5(minima=6, quick=True, cache=str(tmp_path / "cache-fig5"))  # from the cache
    assert [r["gap"] for r in again["rows"]] == [r["gap"] for r in data["rows"]]


def test_fam_quick_end_to_end(tmp_path):
    """`relflat reproduce fam --quick`: grid, arms paired per seed, SAM when installed, JSON and PNG."""
    import matplotlib.image
    from relflat_ext.apps import fam
    assert cli_main(["reproduce", "fam", "--quick", "--out", str(tmp_path)]) == 0
    text = open(tmp_path / "fam.json").read()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))  # strict JSON
    assert data["best_lam"] in fam.QUICK["grid"] and data["grid"][0]["lam"] == 0.0
    assert data["lams"] == [0.0, data["best_lam"] / 10, data["best_lam"], data["best_lam"] * 10]
    arms = list(data["summary"])
    assert arms[:4] == [f"lam={lam:g}" for lam in data["lams"]]
    assert (len(arms) == 5) == fam._sam_available()
    for name in arms:
        runs = data["runs"][name]
        assert len(runs) == fam.QUICK["seeds"] and [r["seed"] for r in runs] == [1, 2]
        finished = [r for r in runs if not r["diverged"]]
        for r in finished:
            assert r["gap"] == pytest.approx(r["test_loss"] - r["train_loss"]) and r["kappa"] > 0
        assert data["summary"][name]["diverged"] == len(runs) - len(finished)
        if finished:
            mean = data["summary"][name]["test_accuracy"]["mean"]
            assert mean == pytest.approx(sum(r["test_accuracy"] for r in finished) / len(finished))
    assert data["summary"]["lam=0"]["paired_vs_plain"]["test_accuracy"]["mean"] == 0.0
    image = matplotlib.image.imread(str(tmp_path / "fam.png"))
    assert image.shape[0] > 100 and image.std() > 0


def test_mnist_split_is_stratified_and_deterministic():
    from relflat_ext.datasets import mnist_split
    first, second = mnist_split(seed=0), mnist_split(seed=0)
    assert all(a.equal(b) for a, b in zip(first, second))
    x_train, y_train, x_val, y_val, x_test, y_test = first
    assert x_train.shape == (3000, 1, 28, 28) and len(y_val) == len(y_test) == 1000
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0
    for y, n in ((y_train, 300), (y_val, 100), (y_test, 100)):
        assert y.bincount().tolist() == [n] * 10
    flat = [x.reshape(len(x), -1) for x in (x_train, x_val, x_test)]  # no image in two parts
    assert len(torch.unique(torch.cat(flat), dim=0)) == 5000 - _duplicates()


def _duplicates():
    from relflat_ext.datasets import load_mnist_subset
    x, _ = load_mnist_subset(image=False)
    return len(x) - len(torch.unique(x, dim=0))
