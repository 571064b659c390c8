"""The scikit-learn digits set as 16x16 images in [-1, 1]: what ``builtin:digits`` and its classifier learn.

One definition, shared by the training scripts and the metrics, so "real digits" means the same pixels
everywhere: the 8x8 images (values 0..16) are scaled to [-1, 1] and upsampled bilinearly to 16x16
(bilinear gives smooth strokes; nearest keeps the 2x2 blocks, which a generator then has to reproduce).
The train / test split is a fixed permutation, independent of any global RNG.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BackendUnavailableError, BadArgumentError

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.2
SPLITS = ("all", "train", "test")


def load_digits_16(split: str = "all", size: int = IMAGE_SIZE):
    """(images (N, 1, size, size) float32 in [-1, 1], labels (N,) int64) of the digits set.

    split: "all" (1,797 images), "train" (80%) or "test" (20%) of a fixed permutation (seed 0).
    """
    if split not in SPLITS:
        raise BadArgumentError(f"split: expected one of {SPLITS}, found {split!r}")
    images, target = _raw_digits()
    x = torch.tensor(images) / 8.0 - 1.0  # 0..16 -> [-1, 1] (a copy: the cached array is read-only)
    x = x[:, None]  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    y = torch.tensor(target)
    if split == "all":
        return x, y
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(y))
    n_test = int(round(TEST_FRACTION * len(y)))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    idx = torch.from_numpy(np.sort(idx))
    return x[idx], y[idx]


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float32 in 0..16, labels (N,) int64), read once per process."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn ships the data file; it is a test / metrics dependency only
        raise BackendUnavailableError("the digits data set needs scikit-learn (pip install scikit-learn)") from e
    data = load_digits()
    images, target = data.images.astype(np.float32), data.target.astype(np.int64)
    images.setflags(write=False)
    target.setflags(write=False)
    return images, target
