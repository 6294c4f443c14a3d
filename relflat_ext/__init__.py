"""relflat_ext: fast, exact relative flatness (Petzka et al., NeurIPS 2021) for PyTorch models.

Main entry points: :func:`relative_flatness` (any ``nn.Linear`` layer of a model),
:func:`relative_flatness_from_features` (a last layer given its features) and
:func:`relative_flatness_autograd` (the authors' full-Hessian baseline); feature robustness
(:func:`feature_robustness`), representativeness through a fused Gaussian-KDE kernel
(:func:`representativeness`, :func:`kde_log_density`, :func:`select_bandwidth`) and the paper's
generalization-gap estimate (:func:`generalization_bound`); the multiplicative-probe estimator
(:func:`stochastic_estimate`, ``relative_flatness(method="stochastic")``) for convolutions,
sequence inputs and any layer whose weight multiplies features. ``build_info()`` says what was
compiled; ``ops`` holds the thin wrappers of the custom kernels.
"""
from ._ext import __version__, build_info
from . import datasets, measures, ops
from .baseline import layer_hessian, relative_flatness_autograd
from .flatness import FlatnessResult, feature_scale, relative_flatness, relative_flatness_from_features
from .kde import BandwidthSelection, kde_log_density, select_bandwidth
from .bound import (BoundResult, RepresentativenessResult, generalization_bound,
                                 representativeness)
from .robustness import FeatureRobustnessResult, feature_robustness
from .stochastic import StochasticEstimate, WeightView, stochastic_estimate
from .profiling import ProfileTable, profile

__all__ = ["__version__", "build_info", "ops", "datasets", "measures", "FlatnessResult", "relative_flatness",
           "relative_flatness_from_features", "relative_flatness_autograd", "layer_hessian", "feature_scale",
           "kde_log_density", "select_bandwidth", "BandwidthSelection", "feature_robustness",
           "FeatureRobustnessResult", "representativeness", "RepresentativenessResult",
           "generalization_bound", "BoundResult", "stochastic_estimate", "StochasticEstimate", "WeightView",
           "profile", "ProfileTable"]
