"""Weights named as parameters, seen the way the model multiplies them: a matrix used as
``x @ W`` (stored (in, out)) is W^T, and a mixture-of-experts layer's stacked expert weights
(experts, out, in) or (experts, in, out) are one (experts * out, in) matrix whose rows all act on
the layer's input features. Against the full Hessian (float64), against the same model written
with nn.Linear, and in the profile, which lists them with the router."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relflat_ext as rf
from relflat_ext.core.usage import multiplication_layouts
from models import assert_unchanged, snapshot


class StackedExperts(nn.Module):
    """Soft-routed experts: ``up`` holds 3 experts' (7, 6) matrices, stored (experts, out, in) for
    ``layout="rows"`` (used by F.linear) or (experts, in, out) for "columns" (used by @)."""

    def __init__(self, layout: str, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layout = layout
        self.inp = nn.Linear(5, 6)
        up = torch.randn(3, 7, 6, generator=g) / 2
        self.up = nn.Parameter(up if layout == "rows" else up.transpose(1, 2).contiguous())
        self.router = nn.Parameter(torch.randn(3, 6, generator=g))
        self.embed = nn.Embedding(4, 5)  # looked up, not multiplied: not listed by the profile
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x + self.embed.weight[0]))
        gate = torch.softmax(F.linear(h, self.router), dim=-1)
        outs = [F.linear(h, self.up[e]) if self.layout == "rows" else h @ self.up[e] for e in range(3)]
        return self.head(sum(gate[:, e:e + 1] * torch.tanh(o) for e, o in enumerate(outs)))


def _data(n=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def _pair():
    torch.manual_seed(0)
    rows = StackedExperts("rows").double()
    columns = StackedExperts("columns").double()
    state = rows.state_dict()
    state["up"] = state["up"].transpose(1, 2).contiguous()
    columns.load_state_dict(state)
    return rows, columns


def test_stacked_experts_in_either_layout_have_the_same_kappa_as_the_full_hessian_says():
    rows, columns = _pair()
    x, y = _data()
    assert torch.allclose(rows(x), columns(x))
    exact = rf.relative_flatness_autograd(rows, "up", x, y).kappa
    assert rf.relative_flatness_autograd(columns, "up", x, y).kappa == pytest.approx(exact, rel=1e-10)
    for model in (rows, columns):
        before = snapshot(model)
        est = rf.relative_flatness(model, "up", x, y, rel_tol=0.03, seed=0)
        assert est.method == "stochastic" and abs(est.kappa - exact) <= 4 * est.kappa_stderr
        assert_unchanged(model, before)
    # the router, a 2-D parameter used by F.linear
    exact_router = rf.relative_flatness_autograd(rows, "router", x, y).kappa
    est = rf.relative_flatness(rows, "router", x, y, rel_tol=0.03, seed=0)
    assert abs(est.kappa - exact_router) <= 4 * est.kappa_stderr


def test_a_matrix_used_as_x_at_w_is_measured_as_its_transpose():
    """Before: a parameter was always taken as (out, in), so ``x @ W`` gave kappa of the wrong
    matrix without a word."""
    class RightMultiplied(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.w = nn.Parameter(linear.weight.detach().T.clone())  # (in, out)
            self.b = nn.Parameter(linear.bias.detach().clone())
            self.head = nn.Linear(7, 4)

        def forward(self, x):
            return self.head(torch.tanh(x @ self.w + self.b))

    torch.manual_seed(0)
    linear_model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    model = RightMultiplied(linear_model[0]).double()
    model.head.load_state_dict(linear_model[2].state_dict())
    x, y = _data()
    expected = rf.relative_flatness(linear_model, "0", x, y).kappa
    assert rf.relative_flatness_autograd(model, "w", x, y).kappa == pytest.approx(expected, rel=1e-10)
    est = rf.relative_flatness(model, "w", x, y, rel_tol=0.03, seed=0)
    assert abs(est.kappa - expected) <= 4 * est.kappa_stderr
    fr = rf.feature_robustness(model, "w", x, y, delta=1e-3, seed=0, n_samples=256)
    ref = rf.feature_robustness(linear_model, "0.weight", x, y, delta=1e-3, seed=0, n_samples=256)  # same draws
    assert fr.value == pytest.approx(ref.value, rel=1e-6)


def test_feature_robustness_of_stacked_experts_agrees_with_kappa():
    rows, _ = _pair()
    x, y = _data(200)
    kappa = rf.relative_flatness_autograd(rows, "up", x, y).kappa
    fr = rf.feature_robustness(rows, "up", x, y, delta=1e-3, seed=0, n_samples=256)
    m = 6
    ratio = fr.value / (1e-3 ** 2 / (2 * m))
    assert abs(ratio - kappa) <= 4 * fr.stderr / (1e-3 ** 2 / (2 * m)) + 0.05 * abs(kappa)


def test_the_profile_lists_expert_stacks_and_routers_but_not_lookup_tables():
    rows, _ = _pair()
    x, y = _data()
    table = rf.profile(rows, x, y, rel_tol=0.1, progress=False)
    listed = {r["layer"]: r for r in table.rows}
    assert set(listed) == {"inp", "head", "router", "up"}
    assert listed["up"]["type"] == "StackedExperts param" and listed["up"]["shape"] == [3, 7, 6]
    exact = rf.relative_flatness_autograd(rows, "up", x, y).kappa
    assert abs(listed["up"]["kappa"] - exact) <= 4 * listed["up"]["kappa_stderr"]
    # a bfloat16 model is watched through its float32 copy: the same layers
    with pytest.warns(RuntimeWarning, match="float32 copy"):
        half = rf.profile(rows.bfloat16(), x.bfloat16(), y, rel_tol=0.5, max_probes=8, hessian_trace=False,
                          progress=False)
    assert {r["layer"] for r in half.rows} == set(listed)


def test_a_stack_the_model_does_not_multiply_gets_an_error_asking_for_a_view():
    class Summed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.Parameter(torch.randn(2, 3, 5))
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(x * self.stack.sum((0, 1)))

    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match="weight_view"):
        rf.relative_flatness(Summed(), "stack", x, y)


def test_mixtral_experts_against_the_full_hessian():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    sizes = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 num_local_experts=3, num_experts_per_tok=2, vocab_size=20, max_position_embeddings=16)
    ids = torch.randint(0, 20, (6, 5))
    batch = {"input_ids": ids, "labels": ids}
    # transformers' default grouped_mm implementation (float32 only) multiplies the stacks the same
    # way round as its eager loop over experts (float64, for the full Hessian)
    fused = transformers.MixtralForCausalLM(transformers.MixtralConfig(**sizes)).eval()
    stacks = {n: p for n, p in fused.named_parameters() if p.dim() == 3}
    assert set(multiplication_layouts(stacks, lambda: fused(input_ids=ids)).values()) == {"rows"}
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(experts_implementation="eager", **sizes))
    model = model.double()
    names = [r["layer"] for r in rf.profile(model, batch, layers="auto", rel_tol=0.5, max_probes=8,
                                            hessian_trace=False, progress=False).rows]
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.experts.down_proj"} <= set(names)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        exact = rf.relative_flatness_autograd(model, name, batch).kappa
        est = rf.relative_flatness(model, name, batch, rel_tol=0.05, seed=0)
        assert abs(est.kappa - exact) <= 4 * est.kappa_stderr


def test_a_forward_that_refuses_to_be_watched_keeps_the_stored_orientation():
    class Refuses(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(5, 6)
            self.extra = nn.Parameter(torch.randn(6, 6))
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            if torch._C._is_torch_function_mode_enabled():
                raise RuntimeError("this model refuses torch-function modes")
            return self.head(torch.tanh(F.linear(torch.tanh(self.body(x)), self.extra)))

    model = Refuses().double()
    x, y = _data()
    with pytest.warns(RuntimeWarning, match="could not watch"):
        rows = rf.profile(model, x, y, progress=False).rows
    assert [r["layer"] for r in rows] == ["body", "head"]
    with pytest.warns(RuntimeWarning, match="could not watch"):
        est = rf.relative_flatness(model, "extra", x, y, rel_tol=0.05, seed=0)
        exact = rf.relative_flatness_autograd(model, "extra", x, y).kappa
    assert abs(est.kappa - exact) <= 4 * est.kappa_stderr


@pytest.mark.parametrize("family, layout", [("qwen2_moe", "rows"), ("olmoe", "rows"), ("gpt_oss", "columns")])
def test_transformers_expert_stacks_are_seen_the_way_each_family_multiplies_them(family, layout):
    """GPT-OSS stores its experts (experts, in, out) and multiplies x @ W[e]; the others (experts,
    out, in) through F.linear: in transformers' default grouped_mm implementation and in its eager
    loop alike. GPT-OSS's stack against the full Hessian (float64, eager)."""
    transformers = pytest.importorskip("transformers")
    sizes = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=20, max_position_embeddings=32)
    configs = {
        "qwen2_moe": lambda impl: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=3, num_experts_per_tok=2,
            experts_implementation=impl, **sizes)),
        "olmoe": lambda impl: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
            num_experts=3, num_experts_per_tok=2, experts_implementation=impl, **sizes)),
        "gpt_oss": lambda impl: transformers.GptOssForCausalLM(transformers.GptOssConfig(
            num_local_experts=3, num_experts_per_tok=2, head_dim=4, layer_types=["full_attention"],
            experts_implementation=impl, **sizes)),
    }
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (3, 6))
    for impl in (None, "eager"):
        model = configs[family](impl).eval()
        stacks = {n: p for n, p in model.named_parameters() if p.dim() == 3}
        assert len(stacks) == 2
        assert set(multiplication_layouts(stacks, lambda: model(input_ids=ids)).values()) == {layout}
    if family == "gpt_oss":
        model, batch = model.double(), {"input_ids": ids, "labels": ids}
        name = "model.layers.0.mlp.experts.gate_up_proj"
        exact = rf.relative_flatness_autograd(model, name, batch).kappa
        est = rf.relative_flatness(model, name, batch, rel_tol=0.05, seed=0)
        assert abs(est.kappa - exact) <= 4 * est.kappa_stderr


class _Written(nn.Module):
    """x (n, 6) through a (6, 4) parameter multiplied as ``how`` says, then a tanh and a head."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64) / 2)  # stored (in, out)
        self.head = nn.Linear(4, 4).double()

    def forward(self, x):
        w = self.w
        h = {"matmul": lambda: x @ w, "einsum": lambda: torch.einsum("bi,io->bo", x, w),
             "einsum-implicit": lambda: torch.einsum("bi,ij", x, w), "tensordot": lambda: torch.tensordot(x, w, 1),
             "tensordot-lists": lambda: torch.tensordot(x, w, dims=([1], [0])),
             "linear-of-transpose": lambda: F.linear(x, w.T),
             "einsum-transposed": lambda: torch.einsum("bi,oi->bo", x, w.T),
             "with-a-penalty": lambda: x @ w + 0 * w.pow(2).sum()}[self.how]()
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("how", ["einsum", "einsum-implicit", "tensordot", "tensordot-lists", "linear-of-transpose",
                                 "einsum-transposed", "with-a-penalty"])
def test_a_parameter_multiplied_by_einsum_or_tensordot_is_seen_as_by_matmul(how):
    """x @ W, einsum("bi,io->bo", x, W) and tensordot(x, W, 1) multiply the same (in, out) matrix:
    one kappa (W^T's). Before, einsum and tensordot counted as no product and the stored rows were
    taken: another number (-0.16 against 0.064 on a trial)."""
    x, y = _data()
    x = torch.cat([x, x[:, :1]], dim=1)  # 6 features
    reference = rf.relative_flatness_autograd(_Written("matmul"), "w", x, y).kappa
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # seen: no warning that the rows are a guess
        got = rf.relative_flatness_autograd(_Written(how), "w", x, y).kappa
    assert got == pytest.approx(reference, rel=1e-10)


def test_a_parameter_used_in_no_product_is_taken_by_its_rows_with_a_warning():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
            self.register_buffer("mask", torch.ones(4, 5, dtype=torch.float64))
            self.head = nn.Linear(4, 4).double()

        def forward(self, x):
            return self.head(torch.tanh(F.linear(x, self.w * self.mask)))
    x, y = _data()
    with pytest.warns(RuntimeWarning, match=r"'w' \(4, 5\) is used by .*mul.* taken as W with rows"):
        masked = rf.relative_flatness_autograd(Masked(), "w", x, y).kappa
    plain = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 4)).double()
    model = Masked()
    plain[0].weight.data, plain[2].weight.data, plain[2].bias.data = model.w.data, model.head.weight.data, \
        model.head.bias.data
    assert masked == pytest.approx(rf.relative_flatness_autograd(plain, "0", x, y).kappa, rel=1e-10)


def test_multihead_attention_projections_are_seen_as_f_linear_takes_them():
    attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)
    params = {n: p for n, p in attention.named_parameters() if p.dim() == 2}
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 4), torch.randn(2, 5, 6)
    assert set(multiplication_layouts(params, lambda: attention(q, k, v)).values()) == {"rows"}


@pytest.mark.parametrize("equation, layout", [("ni,eoi->neo", "rows"), ("ni,eio->neo", "columns"),
                                              ("ni,eio->no", "columns"), ("ni,eoi->ne", "rows"),
                                              ("ni,eoj->no", None), ("ni,eii->ne", None)])
def test_expert_stacks_multiplied_by_einsum(equation, layout):
    """The dim shared with the features and summed is the one multiplied, whatever is summed after
    (the experts, the outputs); no shared dim, or a diagonal, is no product."""
    stack = nn.Parameter(torch.randn(3, 5, 5))
    x = torch.randn(4, 5)
    assert multiplication_layouts({"s": stack}, lambda: torch.einsum(equation, x, stack)) == {"s": layout}
