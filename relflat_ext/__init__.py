"""relflat_ext: fast, exact relative flatness (Petzka et al., NeurIPS 2021) for PyTorch models.

Layers, each importing only from those above it in this list (docs/design.md, "Architecture"):
``ops`` (custom kernels, their wrappers and the pure-PyTorch reference), ``core`` (losses,
layers, data, hooks, HVPs), ``flatness`` (the front door and its paths), ``generalization``
(feature robustness, KDE, representativeness, the bound, comparison measures), ``datasets``,
and ``apps`` (report, reproduction, command line).
"""
from . import ops
from .ops import build_info, fallback_only
from .ops._extension import __version__

# Relative flatness
from .flatness import (FlatnessRegularizer, FlatnessResult, ProfileTable, StochasticEstimate, feature_scale,
                       flatness_penalty, hvp_only, layer_hessian, profile, relative_flatness, relative_flatness_autograd, relative_flatness_from_features,
                       stochastic_estimate, stochastic_estimate_layers)
from .core.layers import WeightView

# Generalization: feature robustness, representativeness (KDE), the bound, comparison measures
from .generalization import (BandwidthSelection, BoundResult, FeatureRobustnessResult, RepresentativenessResult,
                             feature_robustness, generalization_bound, kde_log_density, measures, representativeness,
                             select_bandwidth)
from . import datasets

__all__ = [
    "__version__", "build_info", "ops", "fallback_only", "hvp_only",
    "relative_flatness", "relative_flatness_from_features", "relative_flatness_autograd", "layer_hessian",
    "feature_scale", "FlatnessResult", "stochastic_estimate", "stochastic_estimate_layers", "StochasticEstimate",
    "WeightView", "profile", "ProfileTable", "flatness_penalty", "FlatnessRegularizer",
    "feature_robustness", "FeatureRobustnessResult", "kde_log_density", "select_bandwidth", "BandwidthSelection",
    "representativeness", "RepresentativenessResult", "generalization_bound", "BoundResult", "measures",
    "datasets",
]
