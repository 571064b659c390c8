"""builtin:digits: the shipped model loads and its guided samples are digits the shipped classifier reads.

The sampling loop here is a deliberately plain DDIM (eta = 0) with classifier-free guidance, written out
so that this test checks the trained weights and the spec, independently of fastdiff's samplers.
"""

import os

import pytest
import torch

import fastdiff
from fastdiff.checkpoints.presets import PRESET_DIR
from fastdiff.schedules import make_alphas_cumprod

DIGITS = os.path.join(PRESET_DIR, "digits")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DIGITS, "model.safetensors")),
                                reason=f"the builtin:digits weights are absent ({DIGITS}/model.safetensors); "
                                       "train them with training/train_digits.py")


@torch.no_grad()
def ddim_cfg(model, spec, labels, steps=20, cfg_scale=3.0, seed=0):
    """DDIM (eta 0, trailing timesteps) with CFG in one batched call; the network predicts v or epsilon."""
    s = spec.scheduler
    abar = make_alphas_cumprod(s["beta_schedule"], s["num_train_timesteps"], s.get("beta_start", 1e-4),
                               s.get("beta_end", 0.02)).double()
    n_train = s["num_train_timesteps"]
    ts = [round(n_train - i * n_train / steps) - 1 for i in range(steps)]  # trailing: 999, ..., 49
    b = len(labels)
    x = torch.randn((b, spec.in_channels, *spec.sample_size), generator=torch.Generator().manual_seed(seed))
    y = torch.cat([labels, torch.full_like(labels, spec.null_class)])
    for i, t in enumerate(ts):
        out = model(torch.cat([x, x]), torch.full((2 * b,), t), class_labels=y).double()
        cond, uncond = out[:b], out[b:]
        out = uncond + cfg_scale * (cond - uncond)
        a, sg = abar[t].sqrt(), (1 - abar[t]).sqrt()
        if spec.prediction_type == "v_prediction":
            x0, eps = a * x - sg * out, sg * x + a * out
        else:
            x0 = (x - sg * out) / a
            eps = out
        a_prev = abar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
    return x.clamp(-1, 1)


@pytest.fixture(scope="module")
def digits():
    return fastdiff.load("builtin:digits")


def test_digits_preset_spec(digits):
    spec = digits.spec
    assert spec.kind == "unet" and spec.in_channels == 1 and spec.sample_size == (16, 16)
    assert spec.num_classes == 10 and spec.null_class == 10
    assert spec.scheduler["_class_name"] in ("DDIMScheduler", "DDPMScheduler")
    assert spec.prediction_type == spec.scheduler["prediction_type"]
    assert os.path.getsize(os.path.join(DIGITS, "model.safetensors")) <= 5 * 2 ** 20
    assert sum(p.numel() for p in digits.model.parameters()) <= 1_300_000


def test_guided_samples_are_recognised(digits):
    from fastdiff.metrics import class_accuracy

    labels = torch.arange(10).repeat_interleave(10)  # 10 per class
    x = ddim_cfg(digits.model.eval(), digits.spec, labels, steps=20, cfg_scale=3.0)
    assert x.shape == (100, 1, 16, 16) and torch.isfinite(x).all()
    acc = class_accuracy(x, labels)
    assert acc >= 0.90, f"classifier accuracy on guided samples: {acc:.2f}"


def test_pipeline_generate_recognised(digits):
    """The same bar through fastdiff's own sampler path (spec scheduler config -> DDIM, trailing)."""
    from fastdiff.metrics import class_accuracy

    labels = torch.arange(10).repeat_interleave(10)
    x = digits.generate(100, steps=20, cfg_scale=3.0, class_labels=labels, seed=0, progress=False)
    assert x.shape == (100, 1, 16, 16)
    acc = class_accuracy(x, labels)
    assert acc >= 0.90, f"classifier accuracy on pipe.generate samples: {acc:.2f}"
