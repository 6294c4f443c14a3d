"""The rest of the paper's system around relative flatness: feature robustness (Definition 1,
Theorem 5), Gaussian KDE and representativeness, the generalization-gap estimate, and the
measures the paper compares with. Imports from :mod:`relflat_ext.flatness` and below."""
from . import measures
from .bound import BoundResult, generalization_bound
from .kde import BandwidthSelection, kde_log_density, kfold_ids, select_bandwidth
from .representativeness import RepresentativenessResult, representativeness
from .robustness import FeatureRobustnessResult, feature_robustness, random_perturbations

__all__ = ["measures", "BoundResult", "generalization_bound", "BandwidthSelection", "kde_log_density", "kfold_ids",
           "select_bandwidth", "RepresentativenessResult", "representativeness", "FeatureRobustnessResult",
           "feature_robustness", "random_perturbations"]
