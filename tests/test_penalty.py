"""The differentiable penalty and the training-loop regularizer: kappa and its gradient against
autograd through the dense layer Hessian (the FAM formulation without its gradient cut) in
float64, against the measure, a training step against brute force, autocast, hooks, errors and
DistributedDataParallel."""
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from relflat_ext.core.losses import get_loss
from models import assert_unchanged, data, mlp, snapshot
from testing import gloo_group

LOSSES = ["cross_entropy", "mse", "bce_with_logits"]


def dense_hessian_kappa(phi, weight, bias, tail, targets, loss_fn, normalize=False):
    """kappa_Tr = sum_{s,t} <w_s, w_t> Tr(H_{s,t}) from the dense (d*m)^2 Hessian, differentiable
    (create_graph) in everything: what FAM builds, without cutting the gradient."""
    if normalize:
        scale = (phi - phi.mean(0)).pow(2).mean(0).sqrt()
        phi, weight = phi / scale, weight * scale

    def loss_of(w):
        u = F.linear(phi, w, bias)
        for module in tail:
            u = module(u)
        return loss_fn(u, targets)

    hessian = torch.autograd.functional.hessian(loss_of, weight, create_graph=True)  # (d, m, d, m)
    block_trace = torch.diagonal(hessian, dim1=1, dim2=3).sum(-1)
    return ((weight @ weight.T) * block_trace).sum()


def _targets(loss, n, k, seed=0):
    return data(n, 1, k, loss, seed=seed)[1]


def _tails(d, k):
    return {"last": [], "tanh-linear": [nn.Tanh(), nn.Linear(d, k)],
            "softplus-linear-gelu-linear": [nn.Softplus(), nn.Linear(d, 6), nn.GELU(), nn.Linear(6, k)]}


@pytest.mark.parametrize("loss, tail_name, bias, normalize", list(itertools.product(
    LOSSES, ["last", "tanh-linear", "softplus-linear-gelu-linear"], [True, False], [False, True])))
def test_penalty_and_gradient_equal_the_dense_hessian(loss, tail_name, bias, normalize):
    torch.manual_seed(0)
    n, m, d, k = 11, 5, 4, 3
    tail = [mod.double() for mod in _tails(d, k)[tail_name]]
    phi = torch.randn(n, m, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(d, m, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d, dtype=torch.float64, requires_grad=True) if bias else None
    y = _targets(loss, n, k if tail else d)
    inputs = [t for t in [phi, weight, b] if t is not None] + [p for mod in tail for p in mod.parameters()]
    got = rf.flatness_penalty(phi, weight, y, loss, bias=b, normalize_features=normalize, tail=tail)
    want = dense_hessian_kappa(phi, weight, b, tail, y, get_loss(loss).function, normalize)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    got_grads = torch.autograd.grad(got, inputs, allow_unused=True, materialize_grads=True)
    want_grads = torch.autograd.grad(want, inputs, allow_unused=True, materialize_grads=True)
    for a, c in zip(got_grads, want_grads):
        torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-8 * max(1.0, c.abs().max().item()))


@pytest.mark.parametrize("tail_name", ["last", "tanh-linear"])
def test_penalty_with_a_callable_loss(tail_name):
    torch.manual_seed(1)
    n, m, d, k = 9, 5, 4, 3
    tail = [mod.double() for mod in _tails(d, k)[tail_name]]
    quartic = lambda out, y: ((out - y) ** 4).mean()  # noqa: E731
    phi = torch.randn(n, m, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(d, m, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, k if tail else d, dtype=torch.float64)
    got = rf.flatness_penalty(phi, weight, y, quartic, bias=b, tail=tail)
    want = dense_hessian_kappa(phi, weight, b, tail, y, quartic)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for a, c in zip(torch.autograd.grad(got, [phi, weight, b]), torch.autograd.grad(want, [phi, weight, b])):
        torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("layer, loss", [("4", "cross_entropy"), ("2", "cross_entropy"), ("0", "mse"),
                                         ("4", "bce_with_logits")])
@pytest.mark.parametrize("normalize", [False, True])
def test_regularizer_equals_the_measure(layer, loss, normalize):
    """The regularizer's penalty on one batch is relative_flatness' kappa on that batch."""
    model = mlp([6, 8, 7, 4], "tanh", seed=2)
    x, y = data(40, 6, 4, loss, seed=2)
    want = rf.relative_flatness(model, layer, x, y, loss=loss, normalize_features=normalize).kappa
    with rf.FlatnessRegularizer(model, layer, loss=loss, normalize_features=normalize) as reg:
        model(x)
        got = reg.penalty(y)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_a_training_step_equals_one_on_the_brute_force_penalty():
    """SGD on loss + lam * penalty lands where SGD on loss + lam * (dense-Hessian kappa) does."""
    lam = 0.3
    runs = []
    for brute in (False, True):
        model = mlp([6, 8, 7, 4], "tanh", seed=3)
        x, y = data(32, 6, 4, "cross_entropy", seed=3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        reg = rf.FlatnessRegularizer(model, "2")
        for _ in range(3):
            optimizer.zero_grad()
            out = model(x)
            if brute:
                phi = model[1](model[0](x))
                penalty = dense_hessian_kappa(phi, model[2].weight, model[2].bias, list(model)[3:], y, F.cross_entropy)
            else:
                penalty = reg.penalty(y)
            (F.cross_entropy(out, y) + lam * penalty).backward()
            optimizer.step()
        reg.remove()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, c in zip(*runs):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_gradients_flow_into_earlier_layers_and_the_model_is_left_alone():
    model = mlp([6, 8, 7, 4], "tanh", seed=4)
    x, y = data(20, 6, 4, "cross_entropy", seed=4)
    hooks_before = [dict(m._forward_hooks) for m in model.modules()]
    before = snapshot(model)
    reg = rf.FlatnessRegularizer(model, "4")
    model(x)
    penalty = reg.penalty(y)
    grads = torch.autograd.grad(penalty, list(model.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)  # the first layer too, through the features
    reg.remove()
    assert_unchanged(model, before)
    assert [dict(m._forward_hooks) for m in model.modules()] == hooks_before
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_autocast_computes_the_penalty_in_float32():
    model = mlp([6, 8, 7, 4], "relu", seed=5, dtype=torch.float32)
    x, y = data(64, 6, 4, "cross_entropy", seed=5, dtype=torch.float32)
    reg = rf.FlatnessRegularizer(model, "4")
    model(x)
    plain = reg.penalty(y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
        mixed = reg.penalty(y)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(plain.item(), rel=3e-2)  # bfloat16 features: 3 digits
    mixed.backward()
    assert model[4].weight.grad.dtype == torch.float32


def test_the_penalty_compiles():
    """torch.compile traces the op and its C++-registered derivative (AOTAutograd, no fallback to
    eager): the compiled value and gradients are the eager ones."""
    lin = nn.Linear(20, 5).double()
    phi = torch.randn(64, 20, dtype=torch.float64, requires_grad=True)

    def penalty(features):
        return rf.flatness_penalty(features, lin.weight, None, bias=lin.bias)

    eager = torch.autograd.grad(penalty(phi), [phi, lin.weight, lin.bias])
    compiled = torch.compile(penalty, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(phi), [phi, lin.weight, lin.bias])
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_clear_errors():
    model = mlp([6, 8, 7, 4], "tanh", seed=6)
    x, y = data(10, 6, 4, "cross_entropy", seed=6)
    reg = rf.FlatnessRegularizer(model, "4")
    with pytest.raises(RuntimeError, match="call the model on the batch"):
        reg.penalty(y)
    model(x)
    with pytest.raises(ValueError, match="targets must be class indices"):
        reg.penalty(torch.full((10,), 9))
    reg.remove()
    with pytest.raises(RuntimeError, match="removed"):
        reg.penalty(y)
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        rf.FlatnessRegularizer(model, "1")
    with pytest.raises(ValueError, match="not in the model"):
        rf.FlatnessRegularizer(model, "fc9")

    class Skip(nn.Module):  # the layer's output is used twice: no chain-rule tail
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4).double(), nn.Linear(4, 4).double()

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.tanh(h)) + h

    skip = Skip()
    reg = rf.FlatnessRegularizer(skip, "a")
    skip(x)
    with pytest.raises(ValueError, match="neither produces the model output"):
        reg.penalty(y)
    reg.remove()
    with pytest.raises(ValueError, match="weight must be"):
        rf.flatness_penalty(torch.randn(3, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least one sample"):
        rf.flatness_penalty(torch.randn(0, 5), torch.randn(2, 5))
    with pytest.raises(ValueError, match="tail: a Conv1d is not supported"):
        rf.flatness_penalty(torch.randn(3, 5), torch.randn(2, 5), torch.zeros(3, dtype=torch.long),
                            tail=[nn.Conv1d(1, 1, 1)])


def test_a_weight_used_more_than_once_is_refused():
    """Was a silent wrong answer: a weight tied to the next layer got the penalty of one use (-0.10
    against the full Hessian's kappa 0.156)."""
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    tied = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match="used 2 times"):
        rf.FlatnessRegularizer(tied, "0")

    class Reread(nn.Module):  # fc's output head reads fc's weight again, directly
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6).double()

        def forward(self, x):
            return F.linear(torch.tanh(self.fc(x)), self.fc.weight)
    with pytest.raises(ValueError, match="used 2 times"):
        rf.FlatnessRegularizer(Reread(), "fc")


def test_traced_models_and_data_parallel():
    class Net(nn.Module):  # not a Sequential: the tail comes from a torch.fx trace
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 7), nn.Linear(7, 4)

        def forward(self, x):
            return self.fc3(F.gelu(self.fc2(torch.tanh(self.fc1(x)))))

    torch.manual_seed(7)
    net = Net().double()
    x, y = data(30, 6, 4, "cross_entropy", seed=7)
    want = rf.relative_flatness(net, "fc2", x, y).kappa
    with rf.FlatnessRegularizer(net, "fc2") as reg:
        net(x)
        assert reg.penalty(y).item() == pytest.approx(want, rel=1e-10)
    wrapped = nn.DataParallel(net)  # on a CPU-only machine: the module itself, one chunk
    with rf.FlatnessRegularizer(wrapped, "fc2") as reg:
        wrapped(x)
        assert reg.penalty(y).item() == pytest.approx(want, rel=1e-10)


def _ddp_worker(rank, world, init_file, out_file):
    import gc
    with gloo_group(rank, world, init_file):
        _ddp_step(rank, out_file)
        gc.collect()  # the DDP wrapper (in reference cycles through its hooks) freed before the group goes


def _ddp_step(rank, out_file):
    """One step of a DDP-wrapped MLP with the penalty. Its own function so that the wrapper (its
    reducer's threads) is gone before the process group is destroyed: alive at teardown, it made a
    rank abort ("terminate called without an active exception") about one run in twelve."""
    model = nn.parallel.DistributedDataParallel(mlp([6, 8, 7, 4], "tanh", seed=8))
    x, y = data(40, 6, 4, "cross_entropy", seed=8)
    shard = slice(rank * 20, (rank + 1) * 20)
    reg = rf.FlatnessRegularizer(model, "2")
    out = model(x[shard])
    (F.cross_entropy(out, y[shard]) + 0.5 * reg.penalty(y[shard])).backward()
    if rank == 0:
        torch.save([p.grad for p in model.module.parameters()], out_file)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_distributed_data_parallel_averages_each_ranks_penalty(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    got = torch.load(out)
    model = mlp([6, 8, 7, 4], "tanh", seed=8)
    x, y = data(40, 6, 4, "cross_entropy", seed=8)
    want = [torch.zeros_like(p) for p in model.parameters()]
    reg = rf.FlatnessRegularizer(model, "2")
    for rank in range(2):  # DDP averages the ranks' gradients of their own loss + penalty
        shard = slice(rank * 20, (rank + 1) * 20)
        model.zero_grad()
        out = model(x[shard])
        (F.cross_entropy(out, y[shard]) + 0.5 * reg.penalty(y[shard])).backward()
        want = [w + p.grad / 2 for w, p in zip(want, model.parameters())]
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_a_dead_feature_gets_a_finite_gradient_under_normalization():
    """A ReLU unit that is 0 on the whole batch has zero spread: the normalized measure drops it,
    and the penalty's gradient stays finite (no 0 * inf from the standard deviation at 0)."""
    torch.manual_seed(9)
    phi = torch.randn(20, 5, dtype=torch.float64)
    phi[:, 2] = 0.0
    phi.requires_grad_(True)
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (20,))
    got = rf.flatness_penalty(phi, weight, y, normalize_features=True)
    want = rf.relative_flatness_from_features(phi.detach(), weight.detach(), y, normalize_features=True).kappa
    assert got.item() == pytest.approx(want, rel=1e-10)
    grads = torch.autograd.grad(got, [phi, weight])
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert grads[1][:, 2].abs().max() == 0  # the dropped feature's weight column gets nothing


@pytest.mark.parametrize("margin", [12.0, 30.0])
def test_float32_penalty_through_a_tail_at_a_confident_minimum(margin):
    """Where users train: every sample at logit margin 12 or 30 (1 - p rounds to 0 in float32 from
    about 17 on). Through tanh and a Linear tail the float32 value and gradients agree with float64
    to 1e-4 (measured: at most 7e-6), although kappa itself is down to 3e-8 at margin 30."""
    g = torch.Generator().manual_seed(0)
    n, m, h, k = 32, 40, 48, 10
    f = torch.randn(n, m, generator=g, dtype=torch.float64)
    w1 = torch.randn(h, m, generator=g, dtype=torch.float64) / m ** 0.5
    b1 = 0.1 * torch.randn(h, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    hidden = torch.tanh(f @ w1.T + b1)  # h > n: the head interpolates one-hot logits of the margin exactly
    w2 = torch.linalg.lstsq(hidden, F.one_hot(y, k).double() * margin).solution.T
    results = {}
    for dtype in (torch.float64, torch.float32):
        head = nn.Linear(h, k).to(dtype)
        with torch.no_grad():
            head.weight.copy_(w2)
            head.bias.zero_()
        phi, weight = f.to(dtype).requires_grad_(True), w1.to(dtype).requires_grad_(True)
        value = rf.flatness_penalty(phi, weight, y, bias=b1.to(dtype), tail=[nn.Tanh(), head])
        results[dtype] = (value.detach(),) + torch.autograd.grad(value, [phi, weight, head.weight])
    for got, want in zip(results[torch.float32], results[torch.float64]):
        assert want.abs().max() > 0
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-4


def test_regularizer_on_a_transformer_classifier_head():
    """The model-level call on a model that is not a Sequential (attention, mean pooling): the
    penalty of the head equals the measure, and its gradient reaches the encoder."""
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                                            batch_first=True), 2)
            self.head = nn.Linear(16, 5)

        def forward(self, tokens):
            return self.head(self.encoder(self.embed(tokens)).mean(1))

    torch.manual_seed(10)
    model = Classifier().double().eval()
    tokens, labels = torch.randint(0, 50, (12, 7)), torch.randint(0, 5, (12,))
    want = rf.relative_flatness(model, "head", tokens, labels).kappa
    with rf.FlatnessRegularizer(model, "head") as reg:
        model(tokens)
        penalty = reg.penalty(labels)
    assert penalty.item() == pytest.approx(want, rel=1e-10)
    grad = torch.autograd.grad(penalty, model.encoder.layers[0].self_attn.in_proj_weight)[0]
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["cross_entropy", F.nll_loss])
@pytest.mark.parametrize("layer", ["2", "4"])
def test_penalty_of_a_model_that_returns_log_probabilities(loss, layer):
    """A final LogSoftmax is taken into the loss (CE(log_softmax(u)) = CE(u) = nll_loss(...)): the
    penalty and its gradient are those of the same network returning the logits."""
    torch.manual_seed(0)
    logits = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    log_probs = nn.Sequential(*logits, nn.LogSoftmax(dim=1))  # the same modules
    x, y = data(30, 5, 4, "cross_entropy", seed=1)
    values, grads = [], []
    for model, how in ((log_probs, loss), (logits, "cross_entropy")):
        reg = rf.FlatnessRegularizer(model, layer, loss=how)
        model(x)
        value = reg.penalty(y)
        grads.append(torch.autograd.grad(value, [p for p in logits.parameters()]))
        values.append(value.item())
        reg.remove()
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert values[0] == pytest.approx(rf.relative_flatness(log_probs, layer, x, y, loss=loss).kappa, rel=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
