"""Frechet distances: the formula, and FID with a local copy of pytorch-fid's InceptionV3 weights.

``frechet_distance`` is the distance between two Gaussians fitted to feature sets (Heusel et al. 2017):

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

No general (complex) ``sqrtm`` is needed, so scipy is not either; everything is float64 torch:

* from statistics: S_a S_b has the eigenvalues of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), so
  the trace term is ``sum(sqrt(eigvalsh(...)))`` (two D x D symmetric eigendecompositions);
* from features, when there are fewer samples than dimensions: with centred features A (n_a x D) and
  B (n_b x D), S_a S_b = A^T A B^T B / ((n_a - 1)(n_b - 1)), whose non-zero eigenvalues are those of
  (A B^T)(A B^T)^T, so the trace term is the nuclear norm of the small n_a x n_b matrix A B^T. Exact, and
  it keeps a 2048-wide FID on a few hundred images from costing two 2048 x 2048 eigendecompositions.

Both are real, non-negative and symmetric in (a, b) to rounding, and agree with pytorch-fid's
``scipy.linalg.sqrtm`` route where that one converges.

``fid`` rebuilds the FID Inception network (TF's 2015-12-05 graph as ported by pytorch-fid: torchvision's
InceptionV3 with the ``FIDInceptionA/C/E`` blocks) without torchvision, and reads the weights from the
file pytorch-fid downloads, which must already be on disk: nothing is downloaded here.
"""

from __future__ import annotations

import glob
import math
import os
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadArgumentError, CheckpointError
from .images import as_tensor, check_range, to_unit_range

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_FEATURE_DIM = 2048

ArrayLike = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# The Frechet distance
# --------------------------------------------------------------------------------------------------

def feature_stats(feats: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), unbiased covariance (D, D)) of an (N, D) feature matrix, float64."""
    f = _as_2d_float64(feats, "feats")
    if f.shape[0] < 2:
        raise BadArgumentError(f"feats: expected at least 2 rows to estimate a covariance, found {f.shape[0]}")
    mu = f.mean(dim=0)
    c = f - mu
    return mu, (c.T @ c) / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative rounding noise clipped)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b)."""
    mu_a, mu_b = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mu_a, mu_b))
    sigma_a, sigma_b = (torch.atleast_2d(torch.as_tensor(m, dtype=torch.float64)) for m in (sigma_a, sigma_b))
    d = mu_a.numel()
    if mu_b.numel() != d or tuple(sigma_a.shape) != (d, d) or tuple(sigma_b.shape) != (d, d):
        raise BadArgumentError(f"expected matching statistics, found means {tuple(mu_a.shape)} / {tuple(mu_b.shape)} "
                               f"and covariances {tuple(sigma_a.shape)} / {tuple(sigma_b.shape)}")
    root_a = _sqrt_psd(sigma_a)
    inner = root_a @ sigma_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu_a - mu_b
    fd = diff @ diff + sigma_a.trace() + sigma_b.trace() - 2 * tr_covmean
    return max(float(fd), 0.0)


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (N may differ, N >= 2)."""
    fa, fb = _as_2d_float64(feats_a, "feats_a"), _as_2d_float64(feats_b, "feats_b")
    (n_a, d), n_b = fa.shape, fb.shape[0]
    if fb.shape[1] != d:
        raise BadArgumentError(f"expected feature sets of the same width, found {d} and {fb.shape[1]}")
    if min(n_a, n_b) < 2:
        raise BadArgumentError(f"expected at least 2 feature rows per set to estimate a covariance, "
                               f"found {n_a} and {n_b}")
    if n_a * n_b * min(n_a, n_b) >= d ** 3:  # many samples: the D x D route is cheaper
        return frechet_distance_from_stats(*feature_stats(fa), *feature_stats(fb))
    # Few samples in a wide feature space: the cross-Gram route (see the module docstring).
    mu_a, mu_b = fa.mean(dim=0), fb.mean(dim=0)
    a, b = fa - mu_a, fb - mu_b
    tr_a, tr_b = a.square().sum() / (n_a - 1), b.square().sum() / (n_b - 1)
    tr_covmean = torch.linalg.svdvals(a @ b.T).sum() / math.sqrt((n_a - 1) * (n_b - 1))
    diff = mu_a - mu_b
    return max(float(diff @ diff + tr_a + tr_b - 2 * tr_covmean), 0.0)


def _as_2d_float64(x: ArrayLike, name: str) -> torch.Tensor:
    x = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float64))
    x = x.double()
    if x.ndim != 2:
        raise BadArgumentError(f"{name}: expected an (N, D) feature matrix, found shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise BadArgumentError(f"{name}: expected finite features, found NaN or inf")
    return x


# --------------------------------------------------------------------------------------------------
# FID InceptionV3 (pytorch-fid layout: parameter names match its weight file)
# --------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """conv (no bias) + batch norm (eps 1e-3) + ReLU."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # TF's average pool ignores the padding (count_include_pad=False): the FID blocks' one difference.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b pools with an average (count_include_pad=False), Mixed_7c with a max: TF's graph does."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 up to the 2048-d pool3 features, as pytorch-fid computes them.

    Input: images (N, 3, H, W) in [-1, 1]; they are resized to 299x299 (bilinear) first. ``fc`` (1008
    TF classes) exists only so that the weight file loads strictly; it is not used.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))           # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                                 # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                                # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                                 # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                           # (N, 288, 35, 35)
        x = self.Mixed_6a(x)                                                         # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))            # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                           # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                                    # (N, 2048)


def find_inception_weights(path: Optional[str] = None) -> str:
    """The pytorch-fid weight file: ``path`` (a file, or a folder holding it), else torch hub's cache.

    Raises CheckpointError naming the file and where to get it when there is none.
    """
    candidates = []
    if path is not None:
        if os.path.isfile(path):
            return path
        if os.path.isdir(path):
            candidates = sorted(glob.glob(os.path.join(path, "pt_inception-2015-12-05-*.pth")))
    else:
        hub = os.path.join(torch.hub.get_dir(), "checkpoints")
        candidates = sorted(glob.glob(os.path.join(hub, "pt_inception-2015-12-05-*.pth")))
    if candidates:
        return candidates[0]
    where = path if path is not None else os.path.join(torch.hub.get_dir(), "checkpoints")
    raise CheckpointError(
        f"FID needs the pytorch-fid InceptionV3 weights: expected {FID_WEIGHTS_NAME} at {where}, found none. "
        f"Download it on a machine with internet access ({FID_WEIGHTS_URL}) and pass its path as "
        f"inception_weights=...; fastdiff never downloads it.")


def load_fid_inception(inception_weights: Optional[str] = None, device="cpu") -> FIDInceptionV3:
    """FIDInceptionV3 with the weights of a local pytorch-fid file (read with weights_only=True)."""
    from ..checkpoints.common import check_finite
    from ..checkpoints.io import read_torch_file
    from ..errors import StateDictMismatchError

    path = find_inception_weights(inception_weights)
    state = read_torch_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of InceptionV3 tensors, found {type(state).__name__}")
    with torch.device("meta"):
        net = FIDInceptionV3()
    expected = net.state_dict()
    # Files saved by old torch versions carry no BatchNorm step counters (unused in eval); torchvision-style
    # files may carry the auxiliary classifier, which the FID features never use.
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{path}: expected a state dict of InceptionV3 tensors, found {odd[0]!r}: a "
                              f"{type(state[odd[0]]).__name__}")
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, expected[k].shape, state[k].shape) for k in expected
                  if k in state and tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched, model="FID InceptionV3")
    check_finite(state, name=f"FID InceptionV3 from {path}")
    net.load_state_dict(state, assign=True)
    return net.to(device).float().eval()


def _checked_images(images, name: str) -> torch.Tensor:
    """(N, 1 or 3, H, W) images in one of the two pixel conventions (``metrics.images``), unconverted: each batch
    is converted as it goes, so a large uint8 set never exists in float32 at once."""
    images = as_tensor(images)
    if images.ndim == 3:  # (N, H, W): grey images
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise BadArgumentError(f"{name}: expected images (N, 1 or 3, H, W), found shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise BadArgumentError(f"{name}: expected at least one image, found none")
    check_range(images, name)
    return images


@torch.no_grad()
def inception_features(images, net: FIDInceptionV3, batch_size: int = 50, name: str = "images") -> torch.Tensor:
    """pool3 features (N, 2048), float64: float images in [-1, 1] or integers in [0, 255], 1 or 3 channels."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BadArgumentError(f"batch_size: expected a positive integer, found {batch_size!r}")
    images = _checked_images(images, name)
    device = next(net.parameters()).device
    feats = []
    for i in range(0, len(images), batch_size):
        x = to_unit_range(images[i:i + batch_size]).to(device)
        feats.append(net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).double().cpu())
    return torch.cat(feats)


def fid(images_a, images_b, inception_weights: Optional[str] = None, device="cpu", batch_size: int = 50,
        net: Optional[FIDInceptionV3] = None) -> float:
    """FID between two image sets (float in [-1, 1] or uint8, (N, C, H, W), C = 1 or 3).

    inception_weights: the pytorch-fid file ``pt_inception-2015-12-05-6726825d.pth`` (or its folder);
    default: torch hub's checkpoint cache, where pytorch-fid keeps it. ``net`` reuses a loaded network.
    Matches pytorch-fid's numbers only with those exact weights and at least 2,048 images per set.
    """
    a, b = _checked_images(images_a, "images_a"), _checked_images(images_b, "images_b")  # before loading the network
    for name, images in (("images_a", a), ("images_b", b)):
        if len(images) < 2:
            raise BadArgumentError(f"{name}: expected at least 2 images for a covariance, found {len(images)}")
    net = net if net is not None else load_fid_inception(inception_weights, device=device)
    return frechet_distance(inception_features(a, net, batch_size, "images_a"),
                            inception_features(b, net, batch_size, "images_b"))
