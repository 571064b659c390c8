"""Sample-quality metrics.

* ``frechet_distance(feats_a, feats_b)``: the Frechet distance between Gaussians fitted to two feature sets.
* Digits (for ``builtin:digits``): ``digits_fd(samples)``, digits-FD vs the real digits in the feature
  space of a small shipped classifier; ``class_accuracy(samples, labels)``; ``load_digits_16``.
* ``fid(images_a, images_b, inception_weights=PATH)``: FID with pytorch-fid's InceptionV3 weights from a
  local file (never downloaded).

Needs scikit-learn for the digits data (a test extra); nothing else beyond fastdiff's dependencies.
"""

from .data import load_digits_16
from .digits import (DigitsClassifier, class_accuracy, classify, digits_fd, digits_features, load_classifier,
                     real_stats)
from .fid import FIDInceptionV3, feature_stats, fid, frechet_distance, frechet_distance_from_stats, load_fid_inception

__all__ = [
    "load_digits_16", "DigitsClassifier", "load_classifier", "classify", "class_accuracy", "digits_features",
    "digits_fd", "real_stats", "frechet_distance", "frechet_distance_from_stats", "feature_stats", "fid",
    "FIDInceptionV3", "load_fid_inception",
]
