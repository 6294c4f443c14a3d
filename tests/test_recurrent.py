"""Recurrent layers (nn.RNN, nn.LSTM, nn.GRU): their weight matrices are used inside one fused op,
not through a module's forward, so they are measured as parameters named directly (the
estimator in parameter space), and the profile lists them."""
import pytest
import torch
from torch import nn

import relflat_ext as rf
from relflat_ext.core.hvp import double_backward_kernels
from relflat_ext.core.layers import weight_layers


class Recurrent(nn.Module):
    def __init__(self, kind, **kwargs):
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.rnn = kind(6, 8, batch_first=True, **kwargs)
        out = 8 * (2 if kwargs.get("bidirectional") else 1)
        self.head = nn.Linear(kwargs.get("proj_size") or out, 3)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0][:, -1])


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (24, 5), generator=g), torch.randint(0, 3, (24,), generator=g)


@pytest.mark.parametrize("kind", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_weights_estimated_within_error_bars_of_the_full_hessian(kind):
    torch.manual_seed(0)
    model = Recurrent(kind).double().eval()
    x, y = _data()
    for layer in ("rnn.weight_ih_l0", "rnn.weight_hh_l0"):
        exact = rf.relative_flatness(model, layer, x, y, method="autograd").kappa
        est = rf.relative_flatness(model, layer, x, y, method="stochastic", rel_tol=0.05, max_probes=600, seed=1)
        assert abs(est.kappa - exact) <= 4 * est.kappa_stderr, (layer, est.kappa, est.kappa_stderr, exact)


def test_profile_lists_every_recurrent_weight_matrix():
    model = Recurrent(nn.LSTM, num_layers=2, bidirectional=True)
    names = weight_layers(model)
    assert [n for n in names if n.startswith("rnn.")] == [
        f"rnn.weight_{kind}_l{k}{suffix}" for k in (0, 1) for suffix in ("", "_reverse") for kind in ("ih", "hh")]
    assert weight_layers(Recurrent(nn.LSTM, proj_size=4))[:3] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0",
                                                                   "rnn.weight_hr_l0"]
    x, y = _data()
    table = rf.profile(model, x, y, max_probes=4, rel_tol=0.5, seed=0, hessian_trace=False, progress=False)
    assert [row["layer"] for row in table.rows] == names
    assert table.rows[-1]["method"] == "closed_form"


def test_naming_the_recurrent_module_points_to_its_matrices():
    x, y = _data()
    with pytest.raises(TypeError, match="name one of its weight matrices instead: 'rnn.weight_ih_l0'"):
        rf.relative_flatness(Recurrent(nn.GRU), "rnn", x, y)


def test_double_backward_kernels_turn_cudnn_off_for_recurrent_models_only_and_restore_every_flag():
    cudnn = torch.backends.cudnn
    before = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic)
    try:
        cudnn.benchmark, cudnn.deterministic = True, True
        with double_backward_kernels(Recurrent(nn.LSTM)):
            assert not cudnn.enabled and cudnn.benchmark and cudnn.deterministic
        assert cudnn.enabled == before[0]
        with double_backward_kernels(nn.Sequential(nn.Conv2d(1, 1, 3))):
            assert cudnn.enabled == before[0]  # convolutions keep cuDNN
        assert (cudnn.benchmark, cudnn.deterministic) == (True, True)
    finally:
        cudnn.enabled, cudnn.benchmark, cudnn.deterministic = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: cuDNN's RNN has no double backward")
def test_recurrent_weights_on_cuda_go_around_cudnn():
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM).double().eval()
    x, y = _data()
    exact = rf.relative_flatness(model, "rnn.weight_hh_l0", x, y, method="autograd").kappa
    model.cuda()
    est = rf.relative_flatness(model, "rnn.weight_hh_l0", x.cuda(), y.cuda(), method="stochastic", rel_tol=0.05,
                               max_probes=600, seed=1)
    assert abs(est.kappa - exact) <= 4 * est.kappa_stderr, (est.kappa, est.kappa_stderr, exact)
    assert torch.backends.cudnn.enabled
