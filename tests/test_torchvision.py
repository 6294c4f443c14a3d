"""The profile on torchvision architectures (ResNet-18). torchvision's wheels on the package index
are CUDA builds that import only beside a matching CUDA build of torch, so this runs in CI's second
environment (torch 2.14.1 + torchvision 0.29.1, `.ci/torchvision_check.sh`) and is skipped here."""
import math

import pytest
import torch

torchvision = pytest.importorskip("torchvision", exc_type=ImportError)

import relflat_ext as rf  # noqa: E402
from relflat_ext.apps.cli import main as cli_main  # noqa: E402
from relflat_ext.apps.zoo import load_model  # noqa: E402
from relflat_ext.datasets import synthetic_images  # noqa: E402


def test_the_built_in_resnet18_is_torchvisions():
    """relflat_ext's written-out ResNet-18 (for environments without torchvision): the same module
    names, the same weights under the same seed, the same logits."""
    from relflat_ext.apps.resnet import ResNet18
    torch.manual_seed(3)
    ours = ResNet18(num_classes=10)
    torch.manual_seed(3)
    theirs = torchvision.models.resnet18(num_classes=10)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(ours.eval()(x), theirs.eval()(x))
    assert torch.equal(ours.train()(x), theirs.train()(x))


def test_resnet18_profile_takes_the_right_path_per_layer():
    model = load_model("resnet18", seed=0).eval()
    x, y = synthetic_images(8, seed=0, size=64)
    table = rf.profile(model, x, y, probes="shared", layers=["conv1", "layer4.1.conv2", "fc"], max_probes=8,
                       rel_tol=0.5, hessian_trace=False, progress=False)
    methods = {r["layer"]: r["method"][:17] for r in table.rows}  # shared probes (and maybe their own)
    assert methods == {"conv1": "stochastic-shared", "layer4.1.conv2": "stochastic-shared", "fc": "closed_form"}
    assert all(math.isfinite(r["kappa"]) for r in table.rows)
    assert all(r["kappa_stderr"] > 0 for r in table.rows if r["layer"] != "fc")


def test_resnet18_from_the_command_line(tmp_path, capsys):
    code = cli_main(["profile", "--model", "resnet18", "--data", "synthetic-imagenet", "--samples", "4",
                     "--layers", "fc", "--out", str(tmp_path)])
    assert code == 0 and (tmp_path / "profile.json").exists()
    assert "resnet18 on synthetic-imagenet (4 samples" in capsys.readouterr().out
