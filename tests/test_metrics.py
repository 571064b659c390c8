"""fastdiff.metrics: the Frechet distance, the shipped digits classifier, digits-FD and FID plumbing."""

import os

import numpy as np
import pytest
import torch

from fastdiff.errors import BadArgumentError, CheckpointError
from fastdiff.metrics import (class_accuracy, digits_fd, digits_features, fid, frechet_distance, load_classifier,
                              load_digits_16)
from fastdiff.metrics.fid import (FIDInceptionV3, feature_stats, frechet_distance_from_stats, inception_features,
                                  load_fid_inception)


# ------------------------------------------------------------------------------------------------
# Frechet distance
# ------------------------------------------------------------------------------------------------

def _gaussian(n, d, mean, seed):
    rng = np.random.RandomState(seed)
    a = rng.randn(d, d) / np.sqrt(d)
    return rng.randn(n, d) @ a.T + mean


def test_frechet_distance_identical_is_zero_and_symmetric():
    a, b = _gaussian(500, 16, 0.0, 0), _gaussian(400, 16, 0.5, 1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    assert frechet_distance(torch.from_numpy(a), b) == pytest.approx(frechet_distance(a, b), rel=1e-12)


def test_frechet_distance_closed_form():
    # Diagonal Gaussians: FD = |mu_a - mu_b|^2 + sum (s_a - s_b)^2 (per-dimension standard deviations).
    rng = np.random.RandomState(0)
    z = rng.randn(200_000, 3)
    z = (z - z.mean(0)) / z.std(0, ddof=1)  # exact unit sample moments (diagonal up to sampling noise)
    a, b = z * [1.0, 2.0, 0.5], z[::-1] * [3.0, 2.0, 1.0] + [1.0, 0.0, -2.0]
    expected = 1 + 4 + (1 - 3) ** 2 + 0 + (0.5 - 1) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=2e-2)


@pytest.mark.parametrize("n_a, n_b, d", [(400, 300, 16), (30, 40, 64), (5, 7, 200)])
def test_frechet_distance_matches_scipy_sqrtm(n_a, n_b, d):
    # (30, 40, 64) and (5, 7, 200) take the few-samples cross-Gram route, (400, 300, 16) the D x D one.
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.RandomState(0)
    a = rng.randn(n_a, d) @ rng.randn(d, d) / 4
    b = rng.randn(n_b, d) + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_from_stats(*feature_stats(a), *feature_stats(b)) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_bad_input():
    with pytest.raises(BadArgumentError, match="same width"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(BadArgumentError, match=r"\(N, D\)"):
        frechet_distance(np.zeros(4), np.zeros(4))
    with pytest.raises(BadArgumentError, match="finite"):
        frechet_distance(np.full((4, 2), np.nan), np.zeros((4, 2)))
    with pytest.raises(BadArgumentError, match="at least 2"):
        frechet_distance(np.zeros((1, 2)), np.zeros((4, 2)))


# ------------------------------------------------------------------------------------------------
# The shipped digits classifier and digits-FD
# ------------------------------------------------------------------------------------------------

def test_digits_data_split():
    x, y = load_digits_16("all")
    xtr, ytr = load_digits_16("train")
    xte, yte = load_digits_16("test")
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert len(xtr) + len(xte) == 1797 and set(yte.tolist()) == set(range(10))
    with pytest.raises(BadArgumentError, match="split"):
        load_digits_16("val")


def test_classifier_heldout_accuracy():
    x, y = load_digits_16("test")
    acc = class_accuracy(x, y)
    assert acc >= 0.97, f"held-out accuracy {acc:.4f}"
    assert class_accuracy(((x + 1) * 127.5).round().to(torch.uint8), y) >= 0.97  # uint8 input path


def test_digits_fd_real_vs_heldout_small_noise_large():
    xtr, _ = load_digits_16("train")
    xte, _ = load_digits_16("test")
    real = frechet_distance(digits_features(xtr), digits_features(xte))
    noise = torch.randn(len(xte), 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    fd_noise = digits_fd(noise, reference="train")
    assert digits_fd(xte, reference="train") == pytest.approx(real, rel=1e-9)
    assert fd_noise > 10 * real, (real, fd_noise)
    blurred = torch.nn.functional.avg_pool2d(xte, 3, 1, 1)  # degraded digits land in between
    assert real < digits_fd(blurred, reference="train") < fd_noise


def test_digits_metric_bad_input():
    with pytest.raises(BadArgumentError, match=r"\(N, 1, 16, 16\)"):
        digits_fd(torch.zeros(4, 3, 16, 16))
    with pytest.raises(BadArgumentError, match="one per sample"):
        class_accuracy(torch.zeros(4, 1, 16, 16), [0, 1])
    with pytest.raises(BadArgumentError, match="0..9"):
        class_accuracy(torch.zeros(2, 1, 16, 16), [0, 10])


def test_classifier_missing_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="classifier.safetensors"):
        load_classifier(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# FID (random Inception weights: the real ones cannot be downloaded here)
# ------------------------------------------------------------------------------------------------

def test_fid_missing_weights_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="pt_inception-2015-12-05-6726825d.pth"):
        fid(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16), inception_weights=str(tmp_path))


def _random_fid_weights(path, calibration: torch.Tensor) -> None:
    """Random InceptionV3 weights whose BatchNorm statistics are set from one batch, so that features
    keep a useful scale (raw random init shrinks them to ~1e-8); saved as pytorch-fid's file would be."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, the running stats ARE its stats
    with torch.no_grad():
        net.train()(calibration)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # as old files
    torch.save(state, path)


def test_fid_with_random_inception_weights(tmp_path):
    x = load_digits_16("test")[0][:2]
    noise = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    _random_fid_weights(path, torch.cat([x, noise]).expand(-1, 3, -1, -1))

    loaded = load_fid_inception(str(tmp_path))  # a folder holding the file is accepted too
    feats = inception_features(x, loaded)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and feats.abs().mean() > 1e-3
    scale = float(feats.var(0).sum())
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9 * scale)
    d = fid(x, noise, inception_weights=str(path))
    assert np.isfinite(d) and d > 1e-3 * scale

    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_fid_inception(str(tmp_path / "bad.pth"))


# ------------------------------------------------------------------------------------------------
# Pixel conventions and bad input
# ------------------------------------------------------------------------------------------------

def test_every_integer_dtype_is_taken_as_0_to_255():
    """int64 / int32 images are what they are in uint8 (before: clamped to white as floats); out-of-range integers
    and non-finite floats are refused; float images that look like [0, 255] ones are warned of."""
    x = load_digits_16("test")[0][:8]
    as_uint8 = ((x + 1) * 127.5).round().to(torch.uint8)
    ref = digits_features(as_uint8)
    for dtype in (torch.int64, torch.int32, torch.int16):
        torch.testing.assert_close(digits_features(as_uint8.to(dtype)), ref)
    torch.testing.assert_close(digits_features(as_uint8.numpy().astype(np.int32)), ref)
    with pytest.raises(BadArgumentError, match=r"integer pixels in \[0, 255\], found \[0, 300\]"):
        digits_features(torch.full((2, 1, 16, 16), 300, dtype=torch.int64).index_fill_(0, torch.tensor([0]), 0))
    bad = x.clone()
    bad[1, 0, 3, 3] = float("inf")
    with pytest.raises(BadArgumentError, match="finite pixel values"):
        digits_fd(bad)
    with pytest.warns(UserWarning, match="taken as \\[-1, 1\\] and clamped"):
        digits_features(as_uint8.float())


def test_real_stats_follow_the_classifier_object():
    """Cached reference statistics belong to one classifier: a new one (which may reuse a dead one's id) gets its
    own."""
    import copy

    from fastdiff.metrics.digits import real_stats

    base = load_classifier()
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    mean_base, mean_other = real_stats("test", base)[0], real_stats("test", other)[0]
    assert not torch.allclose(torch.as_tensor(mean_base), torch.as_tensor(mean_other))
    del other
    for _ in range(10):  # new objects, some at a dead one's address: each computes its own
        fresh = copy.deepcopy(base)
        torch.testing.assert_close(torch.as_tensor(real_stats("test", fresh)[0]), torch.as_tensor(mean_base))


def test_metric_inputs_that_make_no_sense_are_refused(tmp_path):
    import json
    import shutil

    with pytest.raises(BadArgumentError, match="expected whole digits, found \\[3.7"):
        class_accuracy(torch.zeros(2, 1, 16, 16), [3.7, 1.0])
    from fastdiff.metrics.digits import CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS, PRESET_DIR

    shutil.copy(os.path.join(PRESET_DIR, CLASSIFIER_WEIGHTS), tmp_path / CLASSIFIER_WEIGHTS)
    (tmp_path / CLASSIFIER_CONFIG).write_text(json.dumps({"config": {"no_such_field": 1}}))
    with pytest.raises(CheckpointError, match="expected classifier.json to describe"):
        load_classifier(str(tmp_path))
    with pytest.raises(BadArgumentError, match="images_a: expected at least one image"):
        fid(torch.zeros(0, 3, 8, 8), torch.zeros(2, 3, 8, 8), inception_weights=str(tmp_path))
    with pytest.raises(BadArgumentError, match="images_b: expected at least 2 images"):
        fid(torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 8, 8), inception_weights=str(tmp_path))
    with pytest.raises(BadArgumentError, match="images_a: expected finite"):
        fid(torch.full((2, 3, 8, 8), float("nan")), torch.zeros(2, 3, 8, 8), inception_weights=str(tmp_path))


def test_inception_weights_with_nan_or_non_tensors_are_refused(tmp_path):
    x = load_digits_16("test")[0][:2]
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    _random_fid_weights(path, x.expand(-1, 3, -1, -1))
    state = torch.load(path, weights_only=True)
    with pytest.raises(BadArgumentError, match="batch_size: expected a positive integer"):
        inception_features(x, load_fid_inception(str(path)), batch_size=0)
    torch.save(dict(state, **{"Conv2d_1a_3x3.conv.weight": state["Conv2d_1a_3x3.conv.weight"] * float("nan")}), path)
    with pytest.raises(CheckpointError, match="expected finite weights"):
        load_fid_inception(str(path))
    torch.save(dict(state, extra_list=[1, 2]), path)
    with pytest.raises(CheckpointError, match="found 'extra_list': a list"):
        load_fid_inception(str(path))


def test_wide_unsigned_images_are_taken_as_0_to_255():
    """16-bit PNGs read through NumPy arrive as uint16 (torch has no min / max kernel for it on the CPU)."""
    x = ((load_digits_16("test")[0][:4] + 1) * 127.5).round().to(torch.uint8)
    ref = digits_features(x)
    torch.testing.assert_close(digits_features(x.numpy().astype(np.uint16)), ref)
    with pytest.raises(BadArgumentError, match="integer pixels in"):
        digits_features(np.full((2, 1, 16, 16), 4000, np.uint16))
