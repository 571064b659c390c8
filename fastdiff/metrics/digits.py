"""Digits metrics: a small shipped classifier, its features, digits-FD and class accuracy.

The classifier (``DigitsClassifier``, trained by ``training/train_digits_classifier.py`` on the fixed
train split of ``fastdiff.metrics.data``) lives beside the model in ``fastdiff/presets/digits``:
``classifier.safetensors`` + ``classifier.json``. Its penultimate layer (``feature_dim`` wide) plays the
part Inception's pool3 plays in FID: digits-FD is the Frechet distance between those features for
generated samples and for the real digits.

Every function takes images as (N, 1, 16, 16) floats in [-1, 1] (what the sampler returns) or uint8
in [0, 255].
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadArgumentError, CheckpointError
from .data import IMAGE_SIZE, NUM_CLASSES, load_digits_16
from .fid import frechet_distance, frechet_distance_from_stats, feature_stats
from .images import as_tensor, check_range, to_unit_range

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "presets", "digits")
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


@dataclass
class ClassifierConfig:
    channels: Sequence[int] = (32, 64, 128)
    feature_dim: int = 128
    num_classes: int = NUM_CLASSES
    image_size: int = IMAGE_SIZE


class DigitsClassifier(nn.Module):
    """Three conv stages (16 -> 8 -> 4 -> global pool), a feature layer, a linear head."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = cfg
        c1, c2, c3 = cfg.channels
        self.convs = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.GroupNorm(8, c1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, padding=1, stride=2), nn.GroupNorm(8, c2), nn.SiLU(),
            nn.Conv2d(c2, c3, 3, padding=1, stride=2), nn.GroupNorm(8, c3), nn.SiLU(),
        )
        self.feature = nn.Linear(c3, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, feature_dim): the space digits-FD is measured in."""
        h = self.convs(x)                        # (N, c3, 4, 4)
        return F.silu(self.feature(h.mean(dim=(2, 3))))  # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))      # (N, num_classes) logits


# --------------------------------------------------------------------------------------------------
# Save / load the shipped classifier
# --------------------------------------------------------------------------------------------------

def save_classifier(model: DigitsClassifier, folder: str, info: Optional[dict] = None) -> None:
    """Write ``classifier.safetensors`` + ``classifier.json`` into ``folder`` (each atomically)."""
    from safetensors.torch import save_file

    from ..utils.atomic import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(os.path.join(folder, CLASSIFIER_WEIGHTS), suffix=".safetensors") as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # temp files are created private; these ship with the package
    with atomic_path(os.path.join(folder, CLASSIFIER_CONFIG), suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump({"config": _cfg_dict(model.config), **(info or {})}, f, indent=1)
        os.chmod(tmp, 0o644)


def _cfg_dict(cfg: ClassifierConfig) -> dict:
    d = asdict(cfg)
    d["channels"] = list(d["channels"])
    return d


_CACHE: dict = {}
# real-digit feature statistics per classifier and split; the classifier's lifetime bounds its entries
_STATS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def load_classifier(folder: Optional[str] = None) -> DigitsClassifier:
    """The shipped digits classifier (eval mode, CPU, float32); cached per folder."""
    from ..checkpoints.io import read_safetensors

    folder = os.path.abspath(folder or PRESET_DIR)
    key = ("classifier", folder)
    if key in _CACHE:
        return _CACHE[key]
    weights, config = os.path.join(folder, CLASSIFIER_WEIGHTS), os.path.join(folder, CLASSIFIER_CONFIG)
    for path in (weights, config):
        if not os.path.isfile(path):
            raise CheckpointError(f"the digits classifier: expected {path}, found none "
                                  f"(train it with training/train_digits_classifier.py)")
    try:
        with open(config, encoding="utf-8") as f:
            model = DigitsClassifier(ClassifierConfig(**json.load(f)["config"]))
        model.load_state_dict(read_safetensors(weights))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # malformed JSON, unknown fields, size mismatches
        raise CheckpointError(f"the digits classifier in {folder}: expected {CLASSIFIER_CONFIG} to describe "
                              f"{CLASSIFIER_WEIGHTS}, found {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    model.eval().requires_grad_(False)
    _CACHE[key] = model
    return model


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def as_digit_images(samples, name: str = "samples") -> torch.Tensor:
    """(N, 1, 16, 16) float32 in [-1, 1] from floats in [-1, 1] or uint8 in [0, 255]; clear errors otherwise."""
    samples = as_tensor(samples)
    if samples.ndim == 3:
        samples = samples[:, None]
    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise BadArgumentError(f"{name}: expected digit images (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                               f"found shape {tuple(samples.shape)}")
    if samples.shape[0] == 0:
        raise BadArgumentError(f"{name}: expected at least one image, found none")
    x = samples.detach().cpu()
    check_range(x, name)
    return to_unit_range(x)


@torch.no_grad()
def digits_features(samples, classifier: Optional[DigitsClassifier] = None, batch_size: int = 512) -> torch.Tensor:
    """Classifier penultimate features (N, feature_dim), float64."""
    x = as_digit_images(samples)
    net = classifier or load_classifier()
    return torch.cat([net.features(x[i:i + batch_size]).double() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def classify(samples, classifier: Optional[DigitsClassifier] = None) -> torch.Tensor:
    """Predicted digit (N,) int64."""
    x = as_digit_images(samples)
    net = classifier or load_classifier()
    return torch.cat([net(x[i:i + 512]).argmax(dim=1) for i in range(0, len(x), 512)])


def class_accuracy(samples, labels, classifier: Optional[DigitsClassifier] = None) -> float:
    """Fraction of samples the classifier recognises as their intended label."""
    labels = torch.as_tensor(labels).view(-1).cpu()
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise BadArgumentError(f"labels: expected whole digits, found {labels[labels != labels.round()][:3].tolist()}")
    labels = labels.long()
    pred = classify(samples, classifier)
    if labels.shape[0] != pred.shape[0]:
        raise BadArgumentError(f"labels: expected one per sample ({pred.shape[0]}), found {labels.shape[0]}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise BadArgumentError(f"labels: expected digits 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    return float((pred == labels).double().mean())


def real_stats(split: str = "all", classifier: Optional[DigitsClassifier] = None):
    """(mean, covariance) of the classifier features of the real digits (cached per split)."""
    net = classifier or load_classifier()
    per_net = _STATS.setdefault(net, {})  # keyed by the network itself: a new one never gets a dead one's numbers
    if split not in per_net:
        per_net[split] = feature_stats(digits_features(load_digits_16(split)[0], net))
    return per_net[split]


def digits_fd(samples, reference: str = "all", classifier: Optional[DigitsClassifier] = None) -> float:
    """digits-FD: Frechet distance of classifier features, samples vs the real digits.

    reference: which real split to compare with ("all", "train" or "test"). Like FID it is biased
    upwards for small sample counts: compare numbers computed from the same number of samples
    (1,000+ for a stable value).
    """
    feats = digits_features(samples, classifier)
    if len(feats) < 2:
        raise BadArgumentError(f"samples: expected at least 2 images for a covariance, found {len(feats)}")
    return frechet_distance_from_stats(*feature_stats(feats), *real_stats(reference, classifier))


__all__ = [
    "ClassifierConfig", "DigitsClassifier", "save_classifier", "load_classifier", "as_digit_images",
    "digits_features", "classify", "class_accuracy", "real_stats", "digits_fd", "frechet_distance",
]
