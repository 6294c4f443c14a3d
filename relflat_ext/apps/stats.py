"""Correlations with uncertainty, for every correlation the reproduction reports: Pearson's r and
Kendall's tau-b with percentile-bootstrap 95% intervals (pairs resampled with replacement; a
resample whose statistic is undefined, a constant variable, is left out rather than making the
interval undefined, which matters for the --quick runs' few data sets)."""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95


def _pearson(x, y, axis=-1):
    x = x - x.mean(axis=axis, keepdims=True)
    y = y - y.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip((x * y).sum(axis) / np.sqrt((x * x).sum(axis) * (y * y).sum(axis)), -1.0, 1.0)


def _kendall(x, y, axis=-1):
    """Kendall's tau-b along ``axis`` for batches of resamples (what scipy.stats.kendalltau gives
    for one pair of vectors), from the pairs' sign agreements, in chunks to bound memory."""
    x, y = np.moveaxis(np.asarray(x), axis, -1), np.moveaxis(np.asarray(y), axis, -1)
    batch = x.shape[:-1]
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    n = x.shape[-1]
    upper = np.triu_indices(n, 1)
    pairs = n * (n - 1) // 2
    out = np.empty(len(x))
    step = max(1, (1 << 24) // max(pairs, 1))
    for start in range(0, len(x), step):
        xs, ys = x[start:start + step], y[start:start + step]
        sx = np.sign(xs[:, upper[0]] - xs[:, upper[1]])
        sy = np.sign(ys[:, upper[0]] - ys[:, upper[1]])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + step] = (sx * sy).sum(-1) / np.sqrt(
                (pairs - (sx == 0).sum(-1)).astype(float) * (pairs - (sy == 0).sum(-1)))
    return out.reshape(batch)


def correlations(x: Sequence[float], y: Sequence[float], seed: int = 0, n_resamples: int = N_RESAMPLES,
                 confidence: float = CONFIDENCE) -> Dict[str, object]:
    """``pearson``, ``kendall`` and their ``pearson_ci``, ``kendall_ci`` ([lo, hi]) for paired
    samples x, y (``seed`` fixes the resamples). Fewer than 3 pairs, or a constant variable, give
    NaN and no interval."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    index = np.random.default_rng(seed).integers(0, len(x), size=(n_resamples, len(x))) if len(x) else None
    out: Dict[str, object] = {}
    for name, statistic in (("pearson", _pearson), ("kendall", _kendall)):
        value = float(statistic(x, y)) if len(x) >= 3 else math.nan
        interval = [math.nan, math.nan]
        if math.isfinite(value):
            resampled = statistic(x[index], y[index])
            resampled = resampled[np.isfinite(resampled)]
            if len(resampled):
                tail = 100 * (1 - confidence) / 2
                interval = [float(v) for v in np.percentile(resampled, [tail, 100 - tail])]
        out[name], out[f"{name}_ci"] = value, interval
    return out


def _partial(x, y, z, axis=-1):
    """Pearson's r of x and y with z held fixed (linearly), along ``axis``."""
    rxy, rxz, ryz = _pearson(x, y, axis), _pearson(x, z, axis), _pearson(y, z, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip((rxy - rxz * ryz) / np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2)), -1.0, 1.0)


def partial_correlation(x: Sequence[float], y: Sequence[float], z: Sequence[float], seed: int = 0,
                        n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> Dict[str, object]:
    """``pearson`` (partial r of x and y given z) and its percentile-bootstrap ``pearson_ci``,
    the triples resampled together."""
    x, y, z = (np.asarray(v, dtype=float) for v in (x, y, z))
    if not x.shape == y.shape == z.shape or x.ndim != 1:
        raise ValueError(f"x, y and z must be 1-D of the same length, got {x.shape}, {y.shape}, {z.shape}")
    value = float(_partial(x, y, z)) if len(x) >= 4 else math.nan
    interval = [math.nan, math.nan]
    if math.isfinite(value):
        index = np.random.default_rng(seed).integers(0, len(x), size=(n_resamples, len(x)))
        resampled = _partial(x[index], y[index], z[index])
        resampled = resampled[np.isfinite(resampled)]
        if len(resampled):
            tail = 100 * (1 - confidence) / 2
            interval = [float(v) for v in np.percentile(resampled, [tail, 100 - tail])]
    return {"pearson": value, "pearson_ci": interval}
