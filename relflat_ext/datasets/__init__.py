"""Data sets that need no download: scikit-learn's digits, and the paper's synthetic tasks."""
from . import synthetic
from .digits import digits_split, load_digits, synthetic_images

__all__ = ["synthetic", "load_digits", "digits_split", "synthetic_images"]
