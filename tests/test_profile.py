"""Per-layer profiles: every weight layer present, numbers equal to single-layer calls; the CLI."""
import json
import math

import pytest
import torch
from torch import nn

import relflat_ext as rf
from relflat_ext.apps.cli import main as cli_main
from relflat_ext.apps import zoo as rf_zoo
from relflat_ext.apps.zoo import lenet5
from models import assert_unchanged, snapshot, train_to_minimum


class Block(nn.Module):
    """A small transformer-like block: token projections, attention-free mixing, an MLP and a head."""

    def __init__(self, m=6, classes=3):
        super().__init__()
        self.q = nn.Linear(m, m)
        self.mlp = nn.Sequential(nn.Linear(m, 2 * m), nn.GELU(), nn.Linear(2 * m, m))
        self.head = nn.Linear(m, classes)

    def forward(self, x):  # (n, T, m)
        h = x + torch.tanh(self.q(x))
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def _digits_like(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def test_cnn_profile_has_every_layer_and_equals_single_calls(tmp_path):
    torch.manual_seed(0)
    model = lenet5().double()
    x, y = _digits_like()
    before = snapshot(model)
    table = rf.profile(model, x, y, probes="shared", rel_tol=0.2, max_probes=128, seed=0, progress=False)
    assert_unchanged(model, before)
    assert [r["layer"] for r in table.rows] == ["0", "3", "7", "9", "11"]
    assert [r["method"][:17] for r in table.rows] == ["stochastic-shared"] * 2 + ["exact", "exact", "closed_form"]
    per_layer = rf.profile(model, x, y, rel_tol=0.2, max_probes=128, seed=0, progress=False)  # the default
    assert [r["method"] for r in per_layer.rows] == ["stochastic", "stochastic", "exact", "exact", "closed_form"]
    for r, p in zip(table.rows, per_layer.rows):
        single = rf.relative_flatness(model, r["layer"], x, y, rel_tol=0.2, max_probes=128, seed=0)
        assert p["kappa"] == pytest.approx(single.kappa, rel=1e-10)
        if r["method"].startswith("stochastic-shared"):  # the two ways agree within their error bars
            assert abs(r["kappa"] - p["kappa"]) <= 4 * math.hypot(r["kappa_stderr"], p["kappa_stderr"])
            assert r["probes"] <= 256 and r["hessian_trace_stderr"] > 0
            trace = rf.stochastic_estimate(model, r["layer"], x, y, quantity="hessian_trace", rel_tol=0.2,
                                           max_probes=128, seed=0)  # the trace from the layer's own probes
            assert r["hessian_trace"] == pytest.approx(trace.value, rel=1e-10)
        else:
            assert r["kappa"] == pytest.approx(single.kappa, rel=1e-10)
        weight = dict(model.named_modules())[r["layer"]].weight.detach()
        assert r["weight_norm_sq"] == pytest.approx(float(weight.pow(2).sum()))
        assert r["hessian_trace"] is not None and r["samples"] == 48
    assert all(r["kappa_normalized"] is not None for r in table.rows if not r["method"].startswith("stochastic"))
    hess, _ = rf.layer_hessian(model, "11", x, y, vectorize=True)  # Tr(H) from the block traces == dense
    assert table.rows[-1]["hessian_trace"] == pytest.approx(torch.trace(hess).item(), rel=1e-8)
    text = str(table)
    assert "kappa" in text and "stochastic" in text and len(text.splitlines()) == 2 + len(table.rows)
    table.to_csv(str(tmp_path / "p.csv"))
    table.to_json(str(tmp_path / "p.json"))
    table.plot(str(tmp_path / "p.png"))
    assert json.load(open(tmp_path / "p.json"))[0]["layer"] == "0"
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_transformer_block_profile():
    torch.manual_seed(0)
    model = Block().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    table = rf.profile(model, x, y, rel_tol=0.2, max_probes=64, progress=False, probes="per_layer")
    assert [r["layer"] for r in table.rows] == ["q", "mlp.0", "mlp.2", "head"]
    assert [r["method"] for r in table.rows] == ["stochastic", "stochastic", "stochastic", "closed_form"]
    for r in table.rows:
        single = rf.relative_flatness(model, r["layer"], x, y, rel_tol=0.2, max_probes=64, seed=0)
        assert math.isfinite(r["kappa"]) and r["kappa"] == pytest.approx(single.kappa, rel=1e-10)
    shared = rf.profile(model, x, y, probes="shared", rel_tol=0.05, max_probes=400, progress=False)
    for r in shared.rows[:3]:
        exact = rf.relative_flatness(model, r["layer"], x, y, method="autograd").kappa
        assert r["method"].startswith("stochastic-shared") and abs(r["kappa"] - exact) <= 4 * r["kappa_stderr"]
    with pytest.raises(ValueError, match="probes must be one of"):
        rf.profile(model, x, y, probes="joint", progress=False)


def test_resnet18_is_there_without_torchvision(tmp_path, capsys):
    """``--model resnet18`` works in an environment whose torchvision does not import (the built-in
    copy, compared with torchvision's in tests/test_torchvision.py): ResNet-18's shapes and names."""
    from relflat_ext.apps.cli import main as cli_main
    from relflat_ext.apps.zoo import load_model
    model = load_model("resnet18", seed=0)
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's count, 1000 classes
    names = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(names) == 21 and names[0] == "conv1" and "layer4.1.conv2" in names and names[-1] == "fc"
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    code = cli_main(["profile", "--model", "resnet18", "--data", "synthetic-imagenet", "--samples", "4",
                     "--layers", "fc", "--out", str(tmp_path)])
    assert code == 0 and "fc" in capsys.readouterr().out and (tmp_path / "profile.csv").exists()


def test_profile_names_and_errors():
    model = lenet5().double()
    x, y = _digits_like(16)
    table = rf.profile(model, x, y, layers=["11"], progress=False)
    assert len(table.rows) == 1
    with pytest.raises(ValueError, match="not in the model"):
        rf.profile(model, x, y, layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        rf.profile(nn.Sequential(nn.Tanh()), x, y, progress=False)


def test_cli_profile_on_builtin_digits(tmp_path, capsys):
    code = cli_main(["profile", "--model", "lenet5", "--data", "digits", "--samples", "300", "--train-epochs", "2",
                     "--rel-tol", "0.3", "--max-probes", "64", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "lenet5 on digits (300 samples" in out
    rows = json.load(open(tmp_path / "profile.json"))
    assert len(rows) == 5 and (tmp_path / "profile.png").exists() and (tmp_path / "profile.csv").exists()


def test_cli_profile_of_a_random_gpt2(tmp_path, capsys):
    pytest.importorskip("transformers")
    code = cli_main(["profile", "--model", "gpt2-tiny-random", "--samples", "4", "--seq-len", "16", "--batch-size", "2",
                     "--rel-tol", "0.5", "--max-probes", "24", "--probes", "shared", "--out", str(tmp_path)])
    assert code == 0
    out, err = capsys.readouterr()
    assert "gpt2-tiny-random on synthetic-tokens (60 samples" in out  # 4 x 15 next-token targets
    assert "Hessian-vector products" in err  # the progress bar
    rows = json.load(open(tmp_path / "profile.json"))
    assert [r["layer"] for r in rows][:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    assert rows[-1]["layer"] == "lm_head" and "tied" not in rows[-1]["method"]
    last_block = {"transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"}
    assert all(r["method"] == "exact" if r["layer"] in last_block else r["method"].startswith("stochastic-shared")
               for r in rows)  # no attention after the last block's projections: exact, tokens as samples
    assert rows[0]["shape"] == [192, 64]  # c_attn's W (d, m); transformers' Conv1D stores it as (64, 192)


def test_cli_profile_of_a_users_regression_model(tmp_path, monkeypatch, capsys):
    """module:function model and data, ``--loss mse``: trained and measured with squared error (the
    exact head equals the library call with loss="mse")."""
    (tmp_path / "user_regression.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "def model():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(64, 5, generator=g)\n"
        "    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin()], 1)\n"
        "    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    code = cli_main(["profile", "--model", "user_regression:model", "--data", "user_regression:data", "--loss", "mse",
                     "--train-epochs", "3", "--rel-tol", "0.3", "--max-probes", "32", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "train loss" in capsys.readouterr().out
    rows = {r["layer"]: r for r in json.load(open(out / "profile.json"))}
    assert set(rows) == {"0", "2"} and rows["2"]["method"] == "closed_form"
    import user_regression
    from relflat_ext.apps.training import fit
    model, loader = user_regression.model(), user_regression.data()
    fit(model, loader, 3, loss="mse")
    torch.testing.assert_close(rows["2"]["kappa"], rf.relative_flatness(model, "2", loader, loss="mse").kappa,
                               rtol=1e-5, atol=0)


def test_cli_rejects_unknown_model_and_data(tmp_path, capsys):
    assert cli_main(["profile", "--model", "no_such_net", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err or "torchvision" in err
    assert cli_main(["profile", "--data", "cifar", "--out", str(tmp_path)]) == 2
    assert "data must be one of" in capsys.readouterr().err


def test_layers_the_shared_probes_leave_unconverged_get_their_own():
    torch.manual_seed(0)
    model = Block().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    table = rf.profile(model, x, y, probes="shared", layers=["q", "mlp.0"], rel_tol=1e-3, max_probes=200,
                       hessian_trace=False, progress=False)
    for r in table.rows:
        exact = rf.relative_flatness(model, r["layer"], x, y, method="autograd").kappa
        # the shared run gives up as soon as no layer is on course (well before its 200 products)
        assert r["method"] == "stochastic-shared+own" and 200 < r["probes"] < 300
        assert abs(r["kappa"] - exact) <= 4 * r["kappa_stderr"]


@pytest.mark.parametrize("problem_type, num_labels", [(None, 3), ("regression", 1)])
def test_cli_profile_of_a_local_hugging_face_checkpoint(tmp_path, capsys, problem_type, num_labels):
    """A folder written by save_pretrained loads as the class its config names (no download);
    synthetic token batches are labelled for the classifier's task, and the head is measured with
    the model's own loss."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=40, num_labels=num_labels, max_position_embeddings=16,
                                     problem_type=problem_type)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "checkpoint")
    code = cli_main(["profile", "--model", str(tmp_path / "checkpoint"), "--samples", "12", "--seq-len", "8",
                     "--rel-tol", "0.5", "--max-probes", "16", "--out", str(tmp_path / "out")])
    assert code == 0
    assert "on synthetic-tokens (12 samples" in capsys.readouterr().out
    rows = json.load(open(tmp_path / "out" / "profile.json"))
    assert rows[-1]["layer"] == "classifier" and rows[-1]["method"] == "closed_form"
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "checkpoint").eval()
    batches = rf_zoo.load_data("synthetic-tokens", batch_size=256, samples=12, seq_len=8, vocab=40, model=model)
    assert rows[-1]["kappa"] == pytest.approx(rf.relative_flatness(model, "classifier", batches).kappa, rel=1e-6)
    assert batches[0]["labels"].dtype == (torch.float32 if num_labels == 1 else torch.int64)


@pytest.mark.parametrize("hessian_trace", [True, False])
def test_normalized_kappa_from_the_exact_paths_own_products(hessian_trace, capsys):
    """Where the exact path runs Hessian-vector products (a LayerNorm after the layer), the profile
    takes Theorem 4's normalized kappa from the same products (a product along W's column k
    scaled by s_k): equal to a separate normalize_features call, for m < d (products along W's
    columns) and m > d (along the unit vectors), with a progress line on stderr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    x = torch.randn(40, 5, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.1, 2.0, 1.0], dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    table = rf.profile(model, x, y, hessian_trace=hessian_trace, rel_tol=0.5, max_probes=16)
    rows = {r["layer"]: r for r in table.rows}
    for layer in ("0", "2"):  # (9, 5): m < d; (4, 9): m > d
        assert rows[layer]["method"] == "exact"
        separate = rf.relative_flatness(model, layer, x, y, normalize_features=True)
        assert "Hessian-vector products" in separate.reason
        torch.testing.assert_close(rows[layer]["kappa_normalized"], separate.kappa, rtol=1e-10, atol=0)
        assert rows[layer]["kappa_normalized"] != pytest.approx(rows[layer]["kappa"], rel=1e-3)
    assert "exact kappa of '0'" in capsys.readouterr().err


def test_normalized_kappa_from_shared_products_at_a_trained_float32_minimum():
    """Where users are: the same LayerNorm-tailed net trained in float32 to a training loss below
    1e-3; the shared products agree with a separate normalize_features call to float32 rounding."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    train_to_minimum(model, x, y, steps=2000, lr=1e-2)
    rows = {r["layer"]: r for r in rf.profile(model, x, y, hessian_trace=False, progress=False).rows}
    for layer in ("0", "2"):
        assert rows[layer]["method"] == "exact"
        separate = rf.relative_flatness(model, layer, x, y, normalize_features=True).kappa
        torch.testing.assert_close(rows[layer]["kappa_normalized"], separate, rtol=1e-6, atol=0)  # measured 1.9e-7


def test_cli_profile_of_a_local_image_classifier_checkpoint(tmp_path, capsys):
    """An image model's checkpoint gets synthetic images of its config's size, channels and labels."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=2, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=4)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    code = cli_main(["profile", "--model", str(tmp_path / "vit"), "--samples", "8", "--rel-tol", "0.5",
                     "--max-probes", "8", "--out", str(tmp_path / "out")])
    assert code == 0
    assert "on synthetic-imagenet (8 samples" in capsys.readouterr().out
    rows = json.load(open(tmp_path / "out" / "profile.json"))
    assert rows[-1]["layer"] == "classifier" and rows[-1]["shape"] == [4, 16] and rows[-1]["method"] == "closed_form"


def test_the_plot_shows_negative_and_estimated_values(tmp_path):
    """kappa near a saddle or at random initialization is negative for some layers: the plot's axis
    is then symmetric-log (a log axis dropped them), positive values spanning decades get a log axis,
    the rest a linear one; unused layers are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from relflat_ext.flatness.profile import ProfileTable, _scale_axis

    def row(layer, kappa, stderr=None, trace=1.0):
        return {"layer": layer, "type": "Linear", "shape": [3, 4], "kappa": kappa, "kappa_stderr": stderr,
                "hessian_trace": trace, "hessian_trace_stderr": stderr, "method": "exact" if stderr is None else
                "stochastic"}
    table = ProfileTable([row("a", -3.0, 0.5), row("b", 0.002), row("c", 150.0), row("unused", None, trace=None)])
    table.plot(str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    for values, scale in (([-3.0, 0.002, 150.0], "symlog"), ([0.002, 150.0], "log"), ([1.0, 2.0, -0.5], "linear")):
        fig, ax = plt.subplots()
        _scale_axis(ax, values)
        assert ax.get_yscale() == scale, (values, ax.get_yscale())
        plt.close(fig)
