"""The loss table: one record per loss, with everything each path needs from it.

The built-in losses mean exactly ``F.cross_entropy``, ``F.mse_loss`` and
``F.binary_cross_entropy_with_logits`` with their default mean reductions. Their Hessians with
respect to the logits ``z`` do not depend on the targets (which is why the kernels take none),
normalized so that the empirical risk is ``E = (1/n) sum_i l_i``:

- cross entropy: ``Hz_i = diag(p_i) - p_i p_i^T``, ``p_i = softmax(z_i)`` (:class:`SoftmaxHessian`)
- MSE (mean over all ``n*d`` entries): ``Hz_i = (2/d) I`` (:class:`DiagonalHessian`)
- BCE with logits (mean over all ``n*d`` entries): ``Hz_i = (1/d) diag(sigma(z_i) sigma(-z_i))``

A record gives: the loss itself (``loss(output, target)``, a mean), the same loss with first and
second derivatives computed without cancellation at confident predictions
(:meth:`Loss.for_derivatives`, for every path that differentiates through autograd), per-sample
losses, the target check, the output Hessian in one of the two structured forms above (the closed
form, the chain rule and lmax contract it), and the statistics representativeness interpolates.
A user's callable becomes a :class:`CallableLoss`: no structured Hessian (paths use
Hessian-vector products) and no target check beyond what the callable does itself.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.stable_math import sigmoid_curvature, softmax_complement, winner_and_rest

LossSpec = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


@dataclasses.dataclass
class DiagonalHessian:
    """``Hz_i = diag(values_i)``, values (n, d)."""
    values: torch.Tensor

    def diagonal(self) -> torch.Tensor:
        return self.values


@dataclasses.dataclass
class SoftmaxHessian:
    """``Hz_i = diag(p_i) - p_i p_i^T``, p (n, d) softmax rows."""
    p: torch.Tensor

    def diagonal(self) -> torch.Tensor:
        return self.p * softmax_complement(self.p)


OutputHessian = Union[DiagonalHessian, SoftmaxHessian]


def _probabilities(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Class-index targets as one-hot rows; probability targets as they are."""
    if target.dim() == like.dim() and target.is_floating_point():
        return target
    return torch.zeros_like(like).scatter_(1, target.long().unsqueeze(1), 1.0)


def cross_entropy_gradient(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``p - y`` per sample (n, d), with the winning class' entry ``(1 - y_k) - sum_{t != k} p_t``."""
    p = torch.softmax(logits, dim=1)
    y = _probabilities(target, logits)
    k, rest = winner_and_rest(p)
    return (p - y).scatter(1, k, (1 - y.gather(1, k)) - rest)


def bce_gradient(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sigma(z) - y`` per entry as ``sigma(z)(1 - y) - y sigma(-z)`` (exact for 0/1 targets)."""
    return torch.sigmoid(logits) * (1 - target) - target * torch.sigmoid(-logits)


class _CrossEntropyGradient(torch.autograd.Function):
    """(p - y) / n, whose derivative along v is ``p * (v - <p, v>) / n``, with
    ``v_s - <p, v> = (v_s - v_k) - sum_t p_t (v_t - v_k)`` (k the winning class): no cancellation
    at the winning class, the entry that carries the signal at a confident minimum."""
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target):
        return cross_entropy_gradient(logits, target) / logits.shape[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, _ = inputs
        ctx.save_for_backward(torch.softmax(logits, dim=1))

    @staticmethod
    def backward(ctx, v):
        (p,) = ctx.saved_tensors
        k = p.argmax(dim=1, keepdim=True)
        dv = v - v.gather(1, k)
        centred = dv - (p * dv).sum(dim=1, keepdim=True)
        return p * centred / p.shape[0], None


class _BceGradient(torch.autograd.Function):
    """(sigma(z) - y) / N, whose derivative is ``sigma(z) sigma(-z) / N`` elementwise."""
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target):
        return bce_gradient(logits, target) / logits.numel()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(sigmoid_curvature(inputs[0]) / inputs[0].numel())

    @staticmethod
    def backward(ctx, v):
        (curvature,) = ctx.saved_tensors
        return v * curvature, None


def _with_gradient(loss_fn, gradient):
    """``loss_fn`` (logits, target) -> mean loss, whose gradient is the Function ``gradient``: so
    Hessian-vector products through it use that Function's backward."""

    class _Loss(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(logits, target):
            return loss_fn(logits, target)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, grad):
            logits, target = ctx.saved_tensors
            return grad * gradient.apply(logits, target), None

    return _Loss


_CrossEntropy = _with_gradient(F.cross_entropy, _CrossEntropyGradient)
_Bce = _with_gradient(F.binary_cross_entropy_with_logits, _BceGradient)




def _token_layout(output: torch.Tensor, target: torch.Tensor) -> bool:
    """The language-model layout: logits (n, ..., vocab) against integer targets (n, ...), the
    classes last (``F.cross_entropy`` wants them in dim 1; where both readings fit, its own wins)."""
    return (output.dim() >= 3 and isinstance(target, torch.Tensor) and not target.is_floating_point()
            and tuple(target.shape) == tuple(output.shape[:-1])
            and tuple(target.shape) != (output.shape[0],) + tuple(output.shape[2:]))


def _cross_entropy(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy``, and for the token layout its mean over tokens (ignored labels -100 left out)."""
    if _token_layout(output, target):
        per = F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1), reduction=reduction)
        return per if reduction == "mean" else per.reshape(target.shape)
    return F.cross_entropy(output, target, reduction=reduction)


def _stable_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if _token_layout(output, target):  # tokens are the rows
        output, target = output.reshape(-1, output.shape[-1]), target.reshape(-1)
    # Other layouts (n, d, ...) and ignored labels (-100): autograd's own derivatives.
    if output.dim() != 2 or (not target.is_floating_point() and bool((target < 0).any())):
        return F.cross_entropy(output, target)
    return _CrossEntropy.apply(output, target)


def _stable_bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not (output.is_floating_point() and target.is_floating_point() and output.shape == target.shape):
        return F.binary_cross_entropy_with_logits(output, target)
    return _Bce.apply(output, target)


class Loss:
    """A loss with mean reduction over samples, and the pieces of it the paths need."""
    name: str
    builtin = True

    def __init__(self, name: str, function: Callable, for_derivatives: Callable):
        self.name, self.function, self.for_derivatives = name, function, for_derivatives

    def __repr__(self) -> str:
        return f"Loss({self.name!r})"

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.function(output, target)

    def per_sample(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """l(f(x_i), y_i) (n,): the terms whose mean is the loss."""
        return self.function(output, target, reduction="none").reshape(output.shape[0], -1).mean(1)

    def per_sample_float64(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """:meth:`per_sample` of the output, taken in float64: a loss near 0 (a confident minimum)
        computed in float32 keeps only the float32 rounding of logits 10-20 in size, which biased
        differences of such losses (feature robustness at small delta: a trained head's E_F came
        out negative; representativeness: 1e-3 relative)."""
        def rows(out, t):
            return self.per_sample(out, t.double() if t.is_floating_point() else t)
        return _float64_rows(rows, output, target)

    def statistics_float64(self, output: torch.Tensor) -> torch.Tensor:
        """:meth:`statistics` of the output, taken in float64."""
        return _float64_rows(self.statistics, output)

    def check(self, output, targets) -> None:
        """The model's output and the targets, as the function takes them: a clear error instead
        of one from deep inside torch."""
        if not isinstance(output, torch.Tensor):
            entry = (f"[{next(iter(output))!r}]" if isinstance(output, dict) and output else
                     "[0]" if isinstance(output, (tuple, list)) else ".logits")
            raise TypeError(f"the model returns a {type(output).__name__}; the built-in loss {self.name!r} needs a "
                            f"tensor: pass a callable loss that picks it, e.g. loss=lambda out, y: "
                            f"F.{self.name}(out{entry}, y)")
        if output.dim() == 0:
            raise ValueError("the model output must have one row per sample, got a 0-dim tensor")
        self.check_targets(targets, tuple(output.shape))

    def check_targets(self, targets: torch.Tensor, output_shape: Sequence[int]) -> None:
        """Float targets of the output's shape."""
        _check_is_tensor(targets, output_shape[0])
        if tuple(targets.shape) != tuple(output_shape) or not targets.is_floating_point():
            raise ValueError(f"targets for {self.name} must be a float tensor of shape {tuple(output_shape)} like the "
                             f"output, got shape {tuple(targets.shape)} and dtype {targets.dtype}")

    def output_hessian(self, logits: torch.Tensor) -> Optional[OutputHessian]:
        """Every sample's ``Hz_i`` for logits (n, d), in structured form."""
        raise NotImplementedError

    def output_hessian_diagonal(self, logits: torch.Tensor) -> torch.Tensor:
        """``Hz_i[s, s]`` (n, d)."""
        return self.output_hessian(logits).diagonal()

    def statistics(self, output: torch.Tensor) -> torch.Tensor:
        """Per-sample statistics v_i (n, c) of the prediction in which the loss at any label is
        affine (so representativeness can average predictions' losses through one kernel pass)."""
        raise NotImplementedError

    def loss_from_statistics(self, weighted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``sum_k w_k l(f(x_k), target)`` from ``weighted = sum_k w_k v_k`` (..., n, c)."""
        raise NotImplementedError


def _check_is_tensor(targets, n: int) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.dim() == 0:
        raise ValueError("targets must have one entry (or row) per sample, got a 0-dim tensor")
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} samples but the features have {n}")


class CrossEntropy(Loss):
    def __init__(self):
        super().__init__("cross_entropy", _cross_entropy, _stable_cross_entropy)

    def check_targets(self, targets: torch.Tensor, output_shape: Sequence[int]) -> None:
        """For outputs (n, d, *rest): class indices (n, *rest) in [0, d) or probabilities (n, d, *rest)
        summing to 1 over d (``F.cross_entropy``'s layouts; ignored labels -100 are allowed); or
        the token layout, logits (n, ..., vocab) against indices (n, ...)."""
        n, shape = output_shape[0], tuple(output_shape)
        _check_is_tensor(targets, n)
        if len(shape) < 2:
            raise ValueError(f"cross_entropy needs outputs (n, d) or (n, d, ...), got shape {shape}")
        d, index_shape = shape[1], (n,) + shape[2:]
        if len(shape) >= 3 and tuple(targets.shape) == shape[:-1] and tuple(targets.shape) != index_shape:
            d, index_shape = shape[-1], shape[:-1]  # the token layout: the classes last
        if d == 1:
            raise ValueError("cross_entropy over a single output is 0 whatever the model does (zero curvature, kappa "
                             "0): for one logit per sample use loss='bce_with_logits' (or 'mse')")
        if tuple(targets.shape) == index_shape and not targets.is_floating_point() and targets.dtype != torch.bool:
            if targets.dtype not in (torch.long, torch.uint8):
                raise ValueError(f"class-index targets for cross_entropy must be int64 (torch.long), as "
                                 f"F.cross_entropy takes them; got {targets.dtype}: pass targets.long()")
            low, high = torch.aminmax(targets) if targets.numel() else (0, 0)  # one pass, not min and max
            if int(low) == -100:  # ignored labels: the range of the others (a second pass only then)
                used = targets[targets != -100]
                low, high = torch.aminmax(used) if used.numel() else (0, 0)
            if int(low) < 0 or int(high) >= d:
                raise ValueError(f"targets must be class indices in [0, {d}) for cross_entropy, got values in "
                                 f"[{int(low)}, {int(high)}]")
            return
        if tuple(targets.shape) == shape and targets.is_floating_point():
            if not torch.allclose(targets.sum(1), torch.ones_like(targets.sum(1)), atol=1e-4):
                raise ValueError("probability targets for cross_entropy must have rows summing to 1 (over the classes, dim 1)")
            return
        raise ValueError(f"targets for cross_entropy must be class indices {(n,) + shape[2:]}, probabilities {shape}, "
                         f"or token indices {shape[:-1]} (logits with the classes last), got shape "
                         f"{tuple(targets.shape)} and dtype {targets.dtype}")

    def output_hessian(self, logits: torch.Tensor) -> SoftmaxHessian:
        return SoftmaxHessian(torch.softmax(logits, dim=1))

    def statistics(self, output: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(output, dim=1)  # l(f, y) = v[y]

    def loss_from_statistics(self, weighted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 1:
            index = target.expand(*weighted.shape[:-2], -1).unsqueeze(-1)
            return weighted.gather(-1, index).squeeze(-1)
        return (weighted * target).sum(-1)


class MeanSquaredError(Loss):
    def __init__(self):
        super().__init__("mse", F.mse_loss, F.mse_loss)

    def output_hessian(self, logits: torch.Tensor) -> DiagonalHessian:
        d = logits.shape[1]
        return DiagonalHessian(torch.full_like(logits, 2.0 / d) if d else torch.zeros_like(logits))

    def statistics(self, output: torch.Tensor) -> torch.Tensor:
        return torch.cat([output.pow(2).sum(1, keepdim=True), output], 1)  # ||f||^2, f

    def loss_from_statistics(self, weighted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = weighted.shape[-1] - 1
        return (weighted[..., 0] - 2 * (weighted[..., 1:] * target).sum(-1) + target.pow(2).sum(-1)) / d


class BceWithLogits(Loss):
    def __init__(self):
        super().__init__("bce_with_logits", F.binary_cross_entropy_with_logits, _stable_bce)

    def output_hessian(self, logits: torch.Tensor) -> DiagonalHessian:
        return DiagonalHessian(sigmoid_curvature(logits) / max(logits.shape[1], 1))

    def statistics(self, output: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.softplus(output).sum(1, keepdim=True), output], 1)  # l = softplus(f) - y f

    def loss_from_statistics(self, weighted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = weighted.shape[-1] - 1
        return (weighted[..., 0] - (weighted[..., 1:] * target).sum(-1)) / d


class CallableLoss(Loss):
    """A user's ``loss_fn(output, target)`` returning the mean over samples (a 0-dim tensor)."""
    builtin = False

    def __init__(self, function: Callable):
        super().__init__(getattr(function, "__name__", "callable"), function, None)
        self.for_derivatives = self.__call__
        self._scores_checked = not _is_nll(function)
        self._reduction_checked = False

    def __call__(self, output, target) -> torch.Tensor:
        try:
            value = self.function(output, target)
        except (IndexError, KeyError, AttributeError, TypeError) as exc:
            if not isinstance(output, torch.Tensor):
                raise
            # A loss written for the model's output object (out["logits"], out.logits) gets the
            # logits: say so, as the error about indexing a tensor does not.
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"relflat_ext: the loss was given a tensor of shape {tuple(output.shape)}: where the "
                             "model returns a dict or an output object with logits, the loss gets those logits, so "
                             "write it for them, e.g. loss=lambda logits, y: F.cross_entropy(logits, y)")
            raise
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"loss must return a 0-dim tensor (the mean over samples), got {type(value).__name__}")
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"loss must return a 0-dim float tensor (the mean over samples, reduction='mean'), "
                             f"got shape {tuple(value.shape)} and dtype {value.dtype}")
        if isinstance(output, torch.Tensor) and output.requires_grad and not value.requires_grad:
            value = value + 0 * output.sum()  # ignores the output: zero curvature, not an autograd error
        return value

    def per_sample(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Only the mean is known: every sample gets it (exact for sums over the samples)."""
        return self(output, target).expand(target.shape[0])

    def per_sample_float64(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The user's function on the output as the model gives it (it may hold float32 tensors)."""
        return self.per_sample(output, target).double()

    def check(self, output, targets) -> None:
        """The callable decides what it takes; checked once: that it averages over the samples (the
        batch given twice has the same loss), and, for nll_loss, that it gets log-probabilities."""
        if not self._reduction_checked:
            self._reduction_checked = True
            self._check_mean(output, targets)
        if self._scores_checked or not isinstance(output, torch.Tensor) or output.dim() < 2 or output.shape[1] < 2:
            return
        self._scores_checked = True
        with torch.no_grad():
            worst = float(torch.logsumexp(output.detach().double(), dim=1).abs().max())
        if worst > 1e-3:  # a row of log-probabilities has logsumexp 0
            warnings.warn(f"relflat_ext: the loss is nll_loss but the model's outputs are not log-probabilities "
                          f"(logsumexp of a row is {worst:.3g} from 0): nll_loss of raw scores is linear in them, so "
                          "the output layer's kappa is 0. For logits use loss='cross_entropy' (or end the model "
                          "with log_softmax)", RuntimeWarning, stacklevel=2)

    def _check_mean(self, output, targets) -> None:
        """A loss summed over the samples (reduction='sum') would make every kappa n times too large:
        the batch given twice doubles it, where a mean keeps it."""
        if not (isinstance(output, torch.Tensor) and isinstance(targets, torch.Tensor) and output.dim() >= 1
                and targets.dim() >= 1 and output.shape[0] == targets.shape[0] > 0):
            return
        with torch.no_grad():
            try:
                once = float(self.function(output.detach(), targets))
                twice = float(self.function(torch.cat([output.detach()] * 2), torch.cat([targets] * 2)))
            except Exception:  # noqa: BLE001 - a loss that cannot take the doubled batch: not checked
                return
        if once != 0 and math.isfinite(once) and abs(twice / once - 2) < 1e-3:
            raise ValueError(f"loss returns the sum over the samples (the batch given twice gave {twice:.6g} against "
                             f"{once:.6g}): relative flatness takes the mean loss, so kappa would be n times too "
                             "large; use reduction='mean' (or divide by the number of samples)")

    def check_targets(self, targets, output_shape: Sequence[int]) -> None:
        """The callable decides what it takes."""

    def output_hessian(self, logits: torch.Tensor) -> None:
        return None  # unknown structure: Hessian-vector products


FLOAT64_CHUNK_ELEMENTS = 1 << 24  # output elements turned into float64 at a time


def _float64_rows(fn: Callable, output: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
    """``fn(output, *rows)`` with the output in float64, in chunks of rows (of the output and of
    ``rows`` alike), so that a vocabulary-wide output is not copied whole."""
    if output.dtype == torch.float64:
        return fn(output, *rows)
    step = max(1, FLOAT64_CHUNK_ELEMENTS // max(1, output[0].numel()))
    return torch.cat([fn(output[r:r + step].double(), *(t[r:r + step] for t in rows))
                      for r in range(0, output.shape[0], step)])


LOSSES: Dict[str, Loss] = {loss.name: loss for loss in (CrossEntropy(), MeanSquaredError(), BceWithLogits())}


def _is_nll(fn: Callable) -> bool:
    return fn is F.nll_loss or isinstance(fn, nn.NLLLoss)


def is_cross_entropy_after_log_softmax(loss: Loss) -> bool:
    """Whether ``loss(log_softmax(u), y)`` is ``cross_entropy(u, y)``: cross entropy (log_softmax is
    idempotent) or nll_loss, built in or as torch's function or module with default arguments."""
    if loss.builtin:
        return loss.name == "cross_entropy"
    fn = loss.function
    if fn in (F.cross_entropy, F.nll_loss):
        return True
    defaults = (getattr(fn, "weight", None) is None and getattr(fn, "reduction", None) == "mean"
                and getattr(fn, "ignore_index", None) == -100)
    return defaults and (type(fn) is nn.NLLLoss or (type(fn) is nn.CrossEntropyLoss and fn.label_smoothing == 0))


def builtin_equivalent(fn: Callable) -> Optional[str]:
    """The built-in loss that a torch loss function or module with the built-ins' arguments is
    (``F.cross_entropy``, ``nn.CrossEntropyLoss()``, ``F.mse_loss``, ``nn.MSELoss()``,
    ``F.binary_cross_entropy_with_logits``, ``nn.BCEWithLogitsLoss()``), so that it gets the closed
    forms and kernels; None for anything else (class weights, label smoothing, pos_weight, ...)."""
    functions = {F.cross_entropy: "cross_entropy", F.mse_loss: "mse",
                 F.binary_cross_entropy_with_logits: "bce_with_logits"}
    if fn in functions:
        return functions[fn]
    if getattr(fn, "reduction", None) != "mean" or getattr(fn, "weight", None) is not None:
        return None
    if type(fn) is nn.CrossEntropyLoss and fn.ignore_index == -100 and fn.label_smoothing == 0:
        return "cross_entropy"
    if type(fn) is nn.MSELoss:
        return "mse"
    if type(fn) is nn.BCEWithLogitsLoss and fn.pos_weight is None:
        return "bce_with_logits"
    return None


def get_loss(loss: Union[LossSpec, Loss]) -> Loss:
    """The record of a built-in loss name or a user callable (torch's own losses with the
    built-ins' arguments become the built-in), with a clear error for anything else."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, nn.modules.loss._Loss) and loss.reduction != "mean":
        raise ValueError(f"loss is a {type(loss).__name__} with reduction={loss.reduction!r}; relative flatness is "
                         "defined for the mean loss over samples: use reduction='mean'")
    if callable(loss) and builtin_equivalent(loss):
        return LOSSES[builtin_equivalent(loss)]
    if callable(loss):
        return CallableLoss(loss)
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]
    raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable loss_fn(output, target) with mean "
                     f"reduction, got {loss!r}")
