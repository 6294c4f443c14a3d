"""Relative flatness of a layer: the front door (:mod:`.api`) and the paths it dispatches to
(:mod:`.closed_form`, :mod:`.exact` with :mod:`.chain_rule` and :mod:`.tail`, :mod:`.stochastic`,
:mod:`.autograd`), and per-layer profiles of whole models (:mod:`.profile`)."""
from .api import choose_path, relative_flatness, relative_flatness_from_features
from .autograd import layer_hessian, relative_flatness_autograd
from .joint import stochastic_estimate_layers
from .normalization import feature_scale
from .penalty import flatness_penalty
from .problem import METHODS, Options, Problem
from .profile import ProfileTable, profile
from .regularizer import FlatnessRegularizer
from .result import FlatnessResult
from .stochastic import StochasticEstimate, stochastic_estimate
from .tail import hvp_only

__all__ = ["relative_flatness", "relative_flatness_from_features", "relative_flatness_autograd", "layer_hessian",
           "choose_path", "feature_scale", "METHODS", "Options", "Problem", "FlatnessResult", "StochasticEstimate",
           "stochastic_estimate", "stochastic_estimate_layers", "ProfileTable", "profile", "hvp_only", "flatness_penalty",
           "FlatnessRegularizer"]
