"""The models used across the package (report, reproduction, profile command, benchmarks), and the
registry of models and data sets the command line can name: built-in ones that need no download,
torchvision architectures, and anything importable as ``module:function``."""
from __future__ import annotations

import importlib
import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..core.data import problem_type
from ..datasets import load_digits, synthetic_images
from .resnet import resnet18

BUILTIN_DATA = ("digits", "digits-flat", "synthetic-imagenet", "synthetic-tokens")
# GPT-2 configurations with random weights (nothing downloaded): the real small model, and a tiny
# one for smoke tests.
GPT2_CONFIGS = {"gpt2-small-random": {},
                "gpt2-tiny-random": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=256)}
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def lenet5(num_classes: int = 10, activation: str = "tanh", image_size: int = 8) -> nn.Sequential:
    """LeNet-5 (two conv + pool stages, three Linear layers 120-84-classes): tanh with average
    pooling, or ReLU with max pooling (positively homogeneous: dividing a layer's weight and bias
    by alpha and multiplying the next layer's weight by alpha keeps the function).
    ``image_size=8``: 3x3 convolutions for scikit-learn's 1x8x8 digits; ``28``: the classic 5x5
    convolutions for 1x28x28 MNIST (the first padded by 2, so 16x5x5 features reach fc1)."""
    act = ACTIVATIONS[activation]
    pool = nn.AvgPool2d if activation == "tanh" else nn.MaxPool2d
    if image_size == 8:
        convs, flat = [nn.Conv2d(1, 6, 3, padding=1), act(), pool(2), nn.Conv2d(6, 16, 3, padding=1)], 16 * 2 * 2
    elif image_size == 28:
        convs, flat = [nn.Conv2d(1, 6, 5, padding=2), act(), pool(2), nn.Conv2d(6, 16, 5)], 16 * 5 * 5
    else:
        raise ValueError(f"image_size must be 8 or 28, got {image_size}")
    return nn.Sequential(*convs, act(), pool(2), nn.Flatten(), nn.Linear(flat, 120), act(), nn.Linear(120, 84), act(),
                         nn.Linear(84, num_classes))


def mlp(widths: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """Linear layers of the given widths (input first, classes last) with the activation between."""
    layers = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _import(spec: str):
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {spec!r} ({exc}); expected module:function") from exc


def synthetic_tokens(samples: int, seq_len: int, vocab: int, batch_size: int, seed: int = 0,
                     model: Optional[nn.Module] = None) -> List[Dict]:
    """Uniform random token sequences as dict batches ``{"input_ids", "labels"}``, ``batch_size``
    sequences per batch. The labels are the tokens (a causal LM shifts them), or, for a
    transformers sequence classifier, random labels of its task (classes, float targets for
    regression, 0/1 vectors for multi-label)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=g)
    labels = ids
    if model is not None and type(model).__name__.endswith("ForSequenceClassification"):
        k, kind = model.config.num_labels, problem_type(model)
        labels = (torch.randn((samples, k) if k > 1 else (samples,), generator=g) if kind == "regression" else
                  (torch.rand((samples, k), generator=g) > 0.5).float() if kind == "multi_label_classification" else
                  torch.randint(0, k, (samples,), generator=g))
    return [{"input_ids": ids[s:s + batch_size], "labels": labels[s:s + batch_size]}
            for s in range(0, samples, batch_size)]


def load_data(spec: str, batch_size: int = 256, samples: Optional[int] = None, seed: int = 0, vocab: int = 1000,
              seq_len: int = 128, model: Optional[nn.Module] = None):
    """A DataLoader for a built-in data set ("digits": scikit-learn's 1797 8x8 images as (1, 8, 8);
    "digits-flat": the same as 64-vectors; "synthetic-imagenet": Gaussian 3x224x224 images with
    random labels, 512 unless ``samples`` (sized and labelled by a transformers ``model``'s config:
    image size, channels, labels); "synthetic-tokens": random sequences of ``seq_len``
    tokens below ``vocab`` as dict batches, 64 unless ``samples``, labelled for ``model``'s task:
    :func:`synthetic_tokens`), or ``module:function`` returning a DataLoader."""
    if ":" in spec:
        return _import(spec)()
    if spec == "synthetic-tokens":
        return synthetic_tokens(samples or 64, seq_len, vocab, batch_size, seed, model)
    if spec in ("digits", "digits-flat"):
        x, y = load_digits(image=spec == "digits")
    elif spec == "synthetic-imagenet":  # shaped for a transformers image classifier's config where given
        config = getattr(model, "config", None)
        size, channels = getattr(config, "image_size", 224), getattr(config, "num_channels", 3)
        x, y = synthetic_images(samples or 512, seed, classes=getattr(config, "num_labels", 1000),
                                size=size if isinstance(size, int) else size[0], channels=channels)
    else:
        raise ValueError(f"data must be one of {BUILTIN_DATA} or module:function, got {spec!r}")
    if samples is not None:
        x, y = x[:samples], y[:samples]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def gpt2_random(spec: str = "gpt2-small-random") -> nn.Module:
    """transformers' GPT2LMHeadModel with random weights, in eval mode: "gpt2-small-random" is
    GPT-2 small (12 layers, width 768, 50257 tokens, embeddings tied to the head)."""
    try:
        import transformers
    except ImportError as exc:
        raise ValueError(f"model {spec!r} needs transformers (pip install transformers)") from exc
    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(**GPT2_CONFIGS[spec])
    config.bos_token_id = config.eos_token_id = config.vocab_size - 1
    return transformers.GPT2LMHeadModel(config).eval()


def hugging_face_checkpoint(path: str) -> nn.Module:
    """A transformers model saved in a local folder (``save_pretrained``: config.json and the
    weights), as the class its config names (``architectures``), in eval mode; nothing is
    downloaded."""
    try:
        import transformers
    except ImportError as exc:
        raise ValueError(f"{path!r} is a Hugging Face checkpoint; it needs transformers (pip install "
                         "transformers)") from exc
    transformers.utils.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ValueError(f"the checkpoint in {path!r} names no transformers class in config.json's "
                         f"'architectures' (got {names}); load it yourself and use module:function")
    return cls.from_pretrained(path, local_files_only=True).eval()


def load_model(spec: str, weights: Optional[str] = None, seed: int = 0) -> nn.Module:
    """"lenet5" (built in), "resnet18" (torchvision's, or the same built in), "gpt2-small-random" /
    "gpt2-tiny-random" (transformers, random weights), a local folder holding a Hugging Face checkpoint (:func:`hugging_face_checkpoint`),
    a torchvision model name (random weights unless ``weights``, a local state_dict file), or
    ``module:function`` returning an nn.Module."""
    torch.manual_seed(seed)
    if os.path.isfile(os.path.join(spec, "config.json")):
        model = hugging_face_checkpoint(spec)
    elif ":" in spec:
        model = _import(spec)()
    elif spec == "lenet5":
        model = lenet5()
    elif spec in GPT2_CONFIGS:
        model = gpt2_random(spec)
    elif spec == "resnet18":
        model = resnet18()  # torchvision's, or the same written out where torchvision does not import
    else:
        try:
            import torchvision
        except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision built for another torch
            raise ValueError(f"model {spec!r} needs torchvision (pip install torchvision), or use 'lenet5', "
                             "'resnet18' or module:function") from exc
        if spec not in torchvision.models.list_models():
            raise ValueError(f"unknown model {spec!r}: 'lenet5', a torchvision model name or module:function")
        model = torchvision.models.get_model(spec, weights=None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} did not give an nn.Module")
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    return model
