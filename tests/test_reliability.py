"""No silent wrong answer and no raw error: every public function validates its input up front
(in the problem object for the measurements) and either returns finite numbers or raises a
ValueError/TypeError that names what is wrong. Cases from a new-user trial and a fuzzer."""
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from models import assert_unchanged, snapshot

METHODS = ["auto", "exact", "closed_form", "stochastic", "autograd"]


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def _data(n=20, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _tied():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(8, 3)).double()


class _DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x):
        return {"scores": self.net(x)}  # no "logits": nothing to pick


def _assert_every_use_counts(model, layer, x, y, phrase) -> float:
    """``auto`` estimates (within 4 standard errors of the full Hessian's kappa, returned) and says
    ``phrase``; the exact paths, which see the module's inputs only, refuse."""
    exact = rf.relative_flatness_autograd(model, layer, x, y).kappa
    auto = rf.relative_flatness(model, layer, x, y, rel_tol=0.03, seed=0)
    assert auto.method == "stochastic" and phrase in auto.reason
    assert abs(auto.kappa - exact) <= 4 * auto.kappa_stderr
    for method in ("exact", "closed_form"):
        with pytest.raises(ValueError, match=phrase):
            rf.relative_flatness(model, layer, x, y, method=method)
    return exact


def test_tied_weights_count_every_use():
    x = torch.randn(30, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(1))
    _assert_every_use_counts(_tied(), "2", x, y, "tied weights")


class _Gain(nn.Module):
    """A weight used elementwise: no matrix that multiplies features."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return x * self.weight


# (what, call, exception, message) for calls that must fail clearly, across methods and functions.
M, X, Y = _mlp, _data()[0], _data()[1]
BAD = []
for method in METHODS:
    layer = "2" if method == "closed_form" else "0"
    BAD += [
        (f"label out of range [{method}]", lambda m=method, l=layer: rf.relative_flatness(
            M(), l, X, torch.full((20,), 7), method=m), ValueError, r"class indices in \[0, 3\)"),
        (f"integer BCE targets [{method}]", lambda m=method, l=layer: rf.relative_flatness(
            M(), l, X, torch.randint(0, 2, (20, 3)), loss="bce_with_logits", method=m), ValueError, "float tensor"),
        (f"float64 inputs into a float32 model [{method}]", lambda m=method, l=layer: rf.relative_flatness(
            M(torch.float32), l, X, Y, method=m), TypeError, "model computes in torch.float32"),
        (f"integer inputs without an embedding [{method}]", lambda m=method, l=layer: rf.relative_flatness(
            M(), l, X.int(), Y, method=m), TypeError, "no embedding"),
        (f"dict inputs [{method}]", lambda m=method, l=layer: rf.relative_flatness(
            M(), l, {"x": X}, Y, method=m), TypeError, "inputs is a dict"),
        (f"dict model output [{method}]", lambda m=method: rf.relative_flatness(
            _DictOutput(), "net.0", X, Y, method=m if m != "closed_form" else "exact"), TypeError, "returns a dict"),
        (f"meta model [{method}]", lambda m=method, l=layer: rf.relative_flatness(
            M().to("meta"), l, X, Y, method=m), ValueError, "meta device"),
    ]
    if method != "closed_form":
        BAD += [
            (f"per-sample callable loss [{method}]", lambda m=method: rf.relative_flatness(
                M(), "0", X, Y, method=m, loss=lambda o, t: F.cross_entropy(o, t, reduction="none")),
             ValueError, "0-dim float tensor"),
            (f"float callable loss [{method}]", lambda m=method: rf.relative_flatness(
                M(), "0", X, Y, method=m, loss=lambda o, t: 1.0), TypeError, "0-dim tensor"),
        ]
BAD += [
    ("MSE target (n,) for output (n, 1), stochastic", lambda: rf.relative_flatness(
        nn.Sequential(nn.Linear(5, 1)).double(), "0", X, torch.randn(20, dtype=torch.float64), loss="mse",
        method="stochastic"), ValueError, r"shape \(20, 1\)"),
    ("feature robustness: label out of range", lambda: rf.feature_robustness(M(), "0", X, torch.full((20,), 7)),
     ValueError, "class indices"),
    ("feature robustness: per-sample callable loss", lambda: rf.feature_robustness(
        M(), "0", X, Y, loss=lambda o, t: F.cross_entropy(o, t, reduction="none")), ValueError, "0-dim"),
    ("feature robustness: a weight that multiplies no features", lambda: rf.feature_robustness(
        nn.Sequential(_Gain(), nn.Linear(5, 3)), "0", X.float(), Y), TypeError, "weight_view"),
    ("feature robustness: an embedding of a large vocabulary", lambda: rf.feature_robustness(
        nn.Sequential(nn.Embedding(30000, 4), nn.Flatten(), nn.Linear(8, 3)), "0", torch.randint(0, 30000, (4, 2)),
        torch.randint(0, 3, (4,)), n_samples=16), ValueError, r"m = 30000 features .* too wide"),
    ("representativeness: conv layer", lambda: rf.representativeness(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3)), "0", torch.randn(4, 1, 8, 8),
        torch.randint(0, 3, (4,)), folds=2), TypeError, "representativeness needs an nn.Linear"),
    ("normalize_features on token inputs, stochastic", lambda: rf.relative_flatness(
        nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)), "1", torch.randint(0, 10, (6, 5)),
        torch.randn(6, 5, 3), loss="mse", method="stochastic", normalize_features=True),
     ValueError, r"normalize_features \(Theorem 4\) needs per-sample feature vectors"),
    ("from_features: no columns, lmax", lambda: rf.relative_flatness_from_features(
        torch.randn(10, 0), torch.randn(3, 0), torch.randint(0, 3, (10,)), lmax=True), ValueError, "one column"),
    ("from_features: no rows, MSE, lmax", lambda: rf.relative_flatness_from_features(
        torch.randn(10, 4), torch.randn(0, 4), torch.randn(10, 0), loss="mse", lmax=True), ValueError, "one row"),
    ("from_features: integer features", lambda: rf.relative_flatness_from_features(
        torch.randint(0, 5, (10, 4)), torch.randn(3, 4), torch.randint(0, 3, (10,)), normalize_features=True),
     TypeError, "floating-point"),
    ("from_features: Inf features, lmax", lambda: rf.relative_flatness_from_features(
        torch.randn(10, 4).index_fill(0, torch.tensor([0]), float("inf")), torch.randn(3, 4),
        torch.randint(0, 3, (10,)), lmax=True), ValueError, "NaN or Inf"),
    ("a generator of batches", lambda: rf.relative_flatness(M(), "0", ((X, Y) for _ in range(2))), TypeError,
     "one-shot iterator"),
    ("numpy inputs", lambda: rf.relative_flatness(M(), "0", X.numpy(), Y), TypeError, r"inputs is a numpy.ndarray"),
    ("numpy targets", lambda: rf.relative_flatness(M(), "0", X, Y.numpy()), TypeError, r"targets is a numpy"),
    ("numpy in a batch", lambda: rf.relative_flatness(M(), "0", [(X, Y.numpy())]), TypeError, "must hold tensors"),
    ("a weight matrix named as a parameter where features are needed", lambda: rf.representativeness(
        M(), "0.weight", X, Y), ValueError, r"is a parameter of shape \(4, 5\), not a module: this needs a module"),
    ("a bias named as a layer", lambda: rf.relative_flatness(M(), "0.bias", X, Y), ValueError,
     r"parameter of shape \(4,\), not a module: relative flatness needs a weight matrix"),
    ("int32 class indices", lambda: rf.relative_flatness(M(), "2", X, Y.int()), ValueError,
     r"must be int64 \(torch.long\), as F.cross_entropy takes them; got torch.int32: pass targets.long\(\)"),
    ("cross entropy over one logit", lambda: rf.relative_flatness(
        nn.Sequential(nn.Linear(6, 1)), "0", torch.randn(4, 6), torch.zeros(4, dtype=torch.long)), ValueError,
     "single output is 0 whatever the model does"),
    ("several inputs as a tuple", lambda: rf.relative_flatness(M(), "0", [((X, X), Y)]), TypeError,
     "pass each batch as a dict of its keyword arguments"),
    ("Fisher-Rao norm: label out of range", lambda: rf.measures.fisher_rao_norm(M(), X, torch.full((20,), 7)),
     ValueError, "class indices"),
    ("KDE: a 2-D tensor of bandwidths", lambda: rf.kde_log_density(X, X, torch.ones(2, 2)), ValueError, "1-D"),
    ("finite inputs too large for float32", lambda: rf.relative_flatness(
        nn.Sequential(nn.Linear(5, 3)), "0", torch.randn(20, 5) * 1e20, torch.randint(0, 3, (20,))),
     ValueError, "too large for torch.float32"),
    ("feature robustness: inputs too large for float32", lambda: rf.feature_robustness(
        nn.Sequential(nn.Linear(5, 3)), "0", torch.randn(20, 5) * 1e20, torch.randint(0, 3, (20,))),
     ValueError, "too large for torch.float32"),
]


@pytest.mark.parametrize("what, call, exc, match", BAD, ids=[c[0] for c in BAD])
def test_bad_calls_fail_clearly(what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("method", ["auto", "stochastic", "autograd"])
def test_a_loss_that_ignores_the_output_has_zero_curvature(method):
    res = rf.relative_flatness(_mlp(), "0", X, Y, method=method, loss=lambda o, t: torch.tensor(1.0))
    assert res.kappa == 0.0


HALF_CALLS = [
    ("last layer", lambda m, x, y: rf.relative_flatness(m, "2", x, y).kappa),
    ("intermediate layer, lmax", lambda m, x, y: rf.relative_flatness(m, "0", x, y, lmax=True).kappa_lmax),
    ("stochastic", lambda m, x, y: rf.relative_flatness(m, "0", x, y, method="stochastic", seed=0).kappa),
    ("autograd", lambda m, x, y: rf.relative_flatness_autograd(m, "0", x, y).kappa),
    ("profile", lambda m, x, y: rf.profile(m, x, y, progress=False).rows[0]["kappa"]),
    ("feature robustness", lambda m, x, y: rf.feature_robustness(m, "0", x, y, seed=0).value),
    ("representativeness", lambda m, x, y: rf.representativeness(m, "0", x, y, folds=2, seed=0).value),
    ("bound", lambda m, x, y: rf.generalization_bound(m, "0", x, y, folds=2, seed=0).bound),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("what, call", HALF_CALLS, ids=[c[0] for c in HALF_CALLS])
def test_half_precision_models_are_measured_in_float32(what, call, dtype):
    """One policy: a half-precision model is measured as a float32 copy (and left as it is)."""
    model = _mlp(dtype)
    x, y = X.to(dtype), Y
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="computed in float32"):
        value = call(model, x, y)
    assert_unchanged(model, before)
    assert math.isfinite(value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = call(model.float(), x.float(), y)  # the float32 copy, measured directly
    assert value == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_half_precision_results_say_so():
    with pytest.warns(RuntimeWarning):
        res = rf.relative_flatness(_mlp(torch.float16), "2", X.half(), Y)
    assert "computed in float32 from a float16 model" in res.reason
    res = rf.relative_flatness_from_features(X.half(), torch.randn(3, 5).half(), Y)
    assert "computed in float32" in res.reason and math.isfinite(res.kappa)
    assert rf.kde_log_density(X.half(), X.half(), 1.0).dtype == torch.float32
    with pytest.warns(RuntimeWarning), pytest.raises(TypeError, match="float64 but the model computes in a half"):
        rf.relative_flatness(_mlp(torch.bfloat16), "2", X.double(), Y)  # not "computes in float32"


def test_kde_is_scale_free_in_float32():
    """Squared distances of data at 1e20 overflow float32; the KDE rescales by a power of two first."""
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    base = rf.kde_log_density(x, x[:10], 0.7)
    big = rf.kde_log_density(x * 1e20, x[:10] * 1e20, 0.7e20)
    torch.testing.assert_close(big, base - 4 * math.log(1e20), rtol=1e-5, atol=1e-3)
    sel = rf.select_bandwidth(x * 1e20, torch.tensor([0.3e20, 0.7e20, 2e20]), folds=5)
    small = rf.select_bandwidth(x, torch.tensor([0.3, 0.7, 2.0]), folds=5).bandwidth
    assert sel.bandwidth == pytest.approx(small * 1e20, rel=1e-6)


FUZZ_CALLS = 300


def _fuzz_call(rng: random.Random):
    """One random call of a public function with random sizes, dtypes, values and arguments."""
    n, m, d = rng.choice([0, 3, 12, 12]), rng.choice([1, 2, 5]), rng.choice([1, 3])
    model_dtype = rng.choice([torch.float32, torch.float64, torch.float64, torch.float16])
    dtype = model_dtype if rng.random() < 0.7 else rng.choice([torch.float32, torch.float64, torch.int64])
    scale = rng.choice([1.0, 1.0, 1.0, 1.0, 1e20, 1e-30, float("nan")])
    g = torch.Generator().manual_seed(rng.randrange(10**6))
    x = (torch.randn(n, m, generator=g) * scale).to(dtype)
    loss = rng.choice(["cross_entropy", "cross_entropy", "mse", "bce_with_logits", "hinge",
                       lambda o, t: (o - o.detach()).sum(), lambda o, t: o.pow(2).mean(1), lambda o, t: 0.5])
    matching = {"cross_entropy": "index", "mse": "float", "bce_with_logits": "float"}.get(loss, "index")
    kind = matching if rng.random() < 0.7 else rng.choice(["index", "float", "float-vector", "wrong-n",
                                                          "out-of-range"])
    y = {"index": lambda: torch.randint(0, d, (n,), generator=g),
         "float": lambda: torch.rand(n, d, generator=g).to(model_dtype),
         "float-vector": lambda: torch.rand(n, generator=g), "wrong-n": lambda: torch.zeros(n + 1, dtype=torch.long),
         "out-of-range": lambda: torch.full((n,), d + 2)}[kind]()
    torch.manual_seed(rng.randrange(10**6))
    model = nn.Sequential(nn.Linear(m, 4), nn.Tanh(), nn.Linear(4, d)).to(model_dtype)
    layer = rng.choice(["0", "2", "0", "2", "1", "9"])
    batch_size = rng.choice([None, None, 5, 0])
    calls = [
        lambda: rf.relative_flatness(model, layer, x, y, loss=loss, method=rng.choice(METHODS), batch_size=batch_size,
                                     lmax=rng.random() < 0.3, normalize_features=rng.random() < 0.3,
                                     block_trace=rng.random() < 0.3, max_probes=8, seed=0),
        lambda: rf.relative_flatness_from_features(x, torch.randn(d, m).to(model_dtype), y, loss=loss,
                                                   lmax=rng.random() < 0.5, normalize_features=rng.random() < 0.5),
        lambda: rf.feature_robustness(model, layer, x, y, loss=loss, n_samples=2, seed=0, batch_size=batch_size),
        lambda: rf.representativeness(model, layer, x, y, loss=loss, folds=2, seed=0),
        lambda: rf.kde_log_density(x, x, rng.choice([1.0, 0.0, -1.0, [0.5, 2.0], float("inf")])),
        lambda: rf.stochastic_estimate(model, layer, x, y, loss=loss, max_probes=4, probes_per_round=2, seed=0),
    ]
    return rng.choice(calls)


def _numbers(result):
    if isinstance(result, torch.Tensor):
        return result.detach().double().flatten().tolist()
    if isinstance(result, list):
        return [v for r in result for v in _numbers(r)]
    fields = ("kappa", "kappa_lmax", "value", "predicted", "stderr")
    return [getattr(result, f) for f in fields if isinstance(getattr(result, f, None), float)]


def test_fuzzed_calls_return_finite_numbers_or_raise_clear_errors():
    """Seeded random calls: each returns finite numbers or raises ValueError/TypeError (the
    package's errors; NoGradientError and user-model errors cannot arise here)."""
    rng = random.Random(0)
    raised = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(FUZZ_CALLS):
            call = _fuzz_call(rng)
            try:
                result = call()
            except (ValueError, TypeError):
                raised += 1
                continue
            numbers = _numbers(result)
            assert all(math.isfinite(v) for v in numbers if v is not None), f"call {k}: {numbers}"
    assert 0 < raised < FUZZ_CALLS  # both outcomes were exercised


def _cli(argv, capsys):
    from relflat_ext.apps.cli import main
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("argv, message", [
    (["report", "--epochs", "0"], "not a positive integer"),
    (["report", "--epochs", "-3"], "not a positive integer"),
    (["profile", "--samples", "-5"], "not a positive integer"),
    (["profile", "--max-probes", "1"], "an integer >= 2"),
    (["profile", "--rel-tol", "0"], "not a positive number"),
    (["profile", "--device", "tpu"], "invalid choice"),
    (["profile", "--model", "no_such_module:build", "--train-epochs", "0"], "cannot import"),
    (["reproduce", "fig9"], "invalid choice"),
])
def test_cli_bad_usage_is_one_line_and_status_2(argv, message, capsys):
    code, err = _cli(argv, capsys)
    assert code == 2 and "Traceback" not in err
    last = err.splitlines()[-1]  # argparse prints the usage first, then the one-line error
    assert last.startswith("relflat") and message in last


def test_cli_checks_outputs_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    code, err = _cli(["report", "--out", str(blocker / "x.json")], capsys)
    assert code == 2 and "cannot create the folder" in err
    code, err = _cli(["profile", "--out", str(blocker), "--train-epochs", "0"], capsys)
    assert code == 2 and "--out" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cli_cuda_without_a_gpu(capsys):
    code, err = _cli(["profile", "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA GPU" in err


def test_data_given_whole_are_batched_to_bound_the_autograd_graph(monkeypatch):
    """50000 CIFAR images passed as tensors went through a convolution's Hessian-vector products in
    one batch (4000 took 5.9 GB). Now the batch size keeps one batch's graph within a budget,
    measured from what autograd saves for 2 and 4 samples; the values are the one-batch values."""
    import relflat_ext.flatness.problem as problem_module
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
    x, y = torch.randn(64, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    whole = {"closed_form": rf.relative_flatness(cnn, "3", x, y),
             "stochastic": rf.relative_flatness(cnn, "0", x, y, seed=0, max_probes=8, rel_tol=1e-9)}
    assert all("in batches of" not in r.reason for r in whole.values())
    per_sample = 4 * 36 * 8 * 3  # about what autograd saves per sample here
    monkeypatch.setattr(problem_module, "GRAPH_BYTES", 16 * per_sample)
    monkeypatch.setattr(problem_module, "INPUT_EXPANSION", 10 ** 6)
    batched = {"closed_form": rf.relative_flatness(cnn, "3", x, y),
               "stochastic": rf.relative_flatness(cnn, "0", x, y, seed=0, max_probes=8, rel_tol=1e-9)}
    for what, result in batched.items():
        assert "in batches of" in result.reason, what
        assert result.kappa == pytest.approx(whole[what].kappa, rel=1e-10), what


class _Reused(nn.Module):
    """fc's weight used by its module and again, directly, later in the forward: the exact paths see
    only the module's inputs. ``branch``: data-dependent control flow, which torch.fx cannot trace
    (the uses are then counted on a watched forward pass)."""

    def __init__(self, branch: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head, self.branch = nn.Linear(5, 5), nn.Linear(5, 3), branch

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.branch and bool(x.sum() > 1e9):
            return self.head(h)
        return self.head(torch.tanh(F.linear(h, self.fc.weight)))


@pytest.mark.parametrize("branch", [False, True])
def test_a_weight_used_outside_its_module_counts_every_use(branch):
    """Was a silent wrong answer: the exact path gave 0.0026 against the full Hessian's 0.072."""
    model = _Reused(branch).double()
    x, y = _data(40)
    exact = _assert_every_use_counts(model, "fc", x, y, "used 2 times")
    # feature robustness perturbs every use, through the weight (the module's inputs alone: 16x less)
    fr = rf.feature_robustness(model, "fc", x, y, delta=1e-3, seed=0, n_samples=512, kappa=exact)
    assert abs(fr.value - fr.predicted) <= 4 * fr.stderr + 0.05 * fr.predicted
    # a model that uses each weight once keeps the exact path
    plain = _Reused(branch).double()
    plain.forward = lambda x: plain.head(torch.tanh(plain.fc(x)))
    assert rf.relative_flatness(plain, "fc", x, y).method in ("exact", "closed_form")


def test_progress_in_a_log_is_lines_not_carriage_returns(capsys):
    """stderr that is not a terminal (a log file, a batch job): "\\r" rewrites piled every update onto
    one line; now the first state and the last, each on its own line (and one every 30 s between)."""
    from relflat_ext.core.progress import ProgressLine
    report = ProgressLine("a test", "probes")
    for done in range(1, 11):
        report(done, 10)
    report.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2 and "1/10 probes (a test" in lines[0] and "10/10 probes (a test" in lines[1]
