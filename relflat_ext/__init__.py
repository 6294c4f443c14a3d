"""relflat_ext: fast, exact relative flatness (Petzka et al., NeurIPS 2021) for PyTorch models.

Main entry points: :func:`relative_flatness` (any ``nn.Linear`` layer of a model),
:func:`relative_flatness_from_features` (a last layer given its features) and
:func:`relative_flatness_autograd` (the authors' full-Hessian baseline). ``build_info()`` says what
was compiled; ``ops`` holds the thin wrappers of the custom kernels.
"""
from ._ext import __version__, build_info
from . import ops
from .baseline import layer_hessian, relative_flatness_autograd
from .flatness import FlatnessResult, feature_scale, relative_flatness, relative_flatness_from_features

__all__ = ["__version__", "build_info", "ops", "FlatnessResult", "relative_flatness",
           "relative_flatness_from_features", "relative_flatness_autograd", "layer_hessian", "feature_scale"]
