"""Data sets for the paper's experiments (synthetic, exactly invertible feature maps)."""
from . import synthetic

__all__ = ["synthetic"]
