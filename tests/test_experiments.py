"""The reproduction CLI writes the JSON, plot and table each figure promises (tiny sizes)."""
import json

import pytest
import torch

from relflat_ext.apps import fig5, layerwise, minima
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
                            "kappa_gap_given_weight_norm_sq", "ridge_psi"}
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
                        lambda figure, separations, datasets, n, seed, device, protocol: real(figure, (2.0,), 3, 40, seed))
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
    other = fig5.reparameterize(model, seed=3)
    torch.testing.assert_close(other(x), model(x), rtol=1e-10, atol=1e-12)
    layer = fig5.LAYER
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
    assert data["n_minima"] == 6 and set(data["measures"]) == set(fig5.MEASURES)
    for v in data["measures"].values():
        assert set(v) == {f"{k}{s}" for k in ("pearson", "kendall", "pearson_ci", "kendall_ci")
                          for s in ("", "_reparam")}
        assert v["kendall_ci"][0] <= v["kendall"] <= v["kendall_ci"][1]
    for r in data["rows"]:  # reparameterization invariance, network by network
        for m in ("relative_flatness", "relative_flatness_normalized"):
            assert r["measures_reparam"][m] == pytest.approx(r["measures"][m], rel=1e-8)
        assert r["train_loss"] < minima.THRESHOLD["mixed"]
    image = matplotlib.image.imread(str(tmp_path / "fig5.png"))
    assert image.shape[0] > 100 and image.std() > 0  # a drawn figure, not a blank
    again = fig5.run_fig5(6, quick=True, cache=str(tmp_path / "cache-fig5"))  # from the cache
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


def test_authors_data_is_seeded_and_the_inversion_exact():
    """The authors'-protocol generator: same seed, same data; another seed, another distribution;
    psi is scikit-learn's ridge; f = psi o phi computes psi on the designed features exactly."""
    from sklearn.linear_model import Ridge
    from relflat_ext.datasets import authors
    first = authors.make_authors_data(1.5, 200, 300, seed=7)
    assert all(a.equal(b) for a, b in zip(first, authors.make_authors_data(1.5, 200, 300, seed=7)))
    assert not first[0].equal(authors.make_authors_data(1.5, 200, 300, seed=8)[0])
    z, y, zt, yt = first
    assert z.shape == (200, 10) and zt.shape == (300, 10) and set(y.tolist()) == {0, 1}
    psi = authors.fit_ridge(z, y)
    ridge = Ridge(alpha=1.0).fit(z.numpy(), y.double().numpy())
    torch.testing.assert_close(psi(zt).detach()[:, 0], torch.from_numpy(ridge.predict(zt.numpy())))
    inverted = authors.invert(z, psi, seed=7)
    assert inverted.x.shape == (200, 784) and len(inverted.scaled) == 4 and min(inverted.scaled) >= 1.0
    with torch.no_grad():
        torch.testing.assert_close(inverted.model(inverted.x), psi(z), rtol=0, atol=1e-10)
        phi = inverted.model[:-1]
        torch.testing.assert_close(phi(inverted.x), z, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="separation"):
        authors.make_authors_data(0.0, 10, 10, seed=0)


def test_fig3_authors_protocol_quick_end_to_end(tmp_path):
    """`relflat reproduce fig3 --protocol authors --quick`: squared error, kappa on psi and on their
    layer (fc4, checked against the authors' full-Hessian method on one data set), JSON and PNG."""
    import matplotlib.image
    import relflat_ext as rf
    from relflat_ext.datasets import authors
    assert cli_main(["reproduce", "fig3", "--protocol", "authors", "--quick", "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "fig3-authors.json"))
    assert data["protocol"] == "authors" and data["loss"] == "mse"
    assert data["separation"] == list(experiments.QUICK_SEPARATIONS["authors"]) and data["n_datasets"] == 20
    for e in data["per_separation"]:
        theirs = e["robustness"]["their_layer"]
        assert theirs["pearson_ci"][0] <= theirs["pearson"] <= theirs["pearson_ci"][1]
        assert all(r["kappa"] > 0 and r["kappa_their_layer"] > 0 for r in e["rows"])
        assert all(r["gap"] == r["test_loss"] - r["train_loss"] for r in e["rows"])
    row = data["per_separation"][0]["rows"][0]
    z, y, _, _ = authors.make_authors_data(data["separation"][0], 500, experiments.TEST_SAMPLES, row["seed"])
    inverted = authors.invert(z, authors.fit_ridge(z, y), row["seed"])
    baseline = rf.relative_flatness(inverted.model, "fc4", inverted.x, y.double()[:, None], loss="mse",
                                    method="autograd").kappa
    assert row["kappa_their_layer"] == pytest.approx(baseline, rel=1e-10)
    image = matplotlib.image.imread(str(tmp_path / "fig3-authors.png"))
    assert image.shape[0] > 100 and image.std() > 0


def test_fig5_mnist_authors_and_layerwise_quick_end_to_end(tmp_path):
    """`relflat reproduce fig5 --dataset mnist --regime authors --quick`, then `layerwise --quick` on
    the same (cached) minima: the authors' SGD regime, the weight-decay term, every layer's kappa."""
    import matplotlib.image
    out = str(tmp_path)
    assert cli_main(["reproduce", "fig5", "--dataset", "mnist", "--regime", "authors", "--quick", "--out", out]) == 0
    data = json.load(open(tmp_path / "fig5-mnist-authors.json"))
    assert data["regime"] == "authors" and data["n_minima"] == fig5.QUICK_MINIMA and "MNIST" in data["dataset"]
    for r in data["rows"]:
        assert r["optimizer"] == "plain_sgd" and r["batch_size"] == 64 and r["weight_decay"] == 5e-4
        assert r["train_loss"] < minima.THRESHOLD["authors"]
        m = r["measures"]
        assert m["relative_flatness_weight_decay"] == pytest.approx(
            m["relative_flatness"] + 5e-4 * 84 * m["weight_norm"], rel=1e-12)
        assert r["measures_reparam"]["relative_flatness"] == pytest.approx(m["relative_flatness"], rel=1e-8)
    assert cli_main(["reproduce", "layerwise", "--quick", "--out", out]) == 0
    lw = json.load(open(tmp_path / "layerwise.json"))
    assert set(lw["layers"]) == set(layerwise.LAYERS.values()) | {"sum of layers"}
    assert [r["seed"] for r in lw["rows"]] == [r["seed"] for r in data["rows"]]  # the same minima
    for r, f5 in zip(lw["rows"], data["rows"]):
        assert r["gap"] == pytest.approx(f5["gap"], rel=1e-12)
        assert r["layers"]["fc3"]["kappa"] == pytest.approx(f5["measures"]["relative_flatness"], rel=1e-10)
        for name in ("conv1", "conv2"):
            assert r["layers"][name]["method"] == "stochastic" and r["layers"][name]["stderr"] > 0
    for name in ("fig5-mnist-authors.png", "layerwise.png"):
        image = matplotlib.image.imread(str(tmp_path / name))
        assert image.shape[0] > 100 and image.std() > 0


@pytest.mark.parametrize("argv, message", [
    (["fig5", "--protocol", "authors"], "protocol='authors' applies to fig3 only"),
    (["fig3", "--regime", "authors"], "regime='authors' applies to fig5 only"),
    (["layerwise", "--dataset", "mnist"], "dataset='mnist' applies to fig5 only"),
])
def test_reproduce_options_belong_to_their_figure(tmp_path, capsys, argv, message):
    assert cli_main(["reproduce", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
