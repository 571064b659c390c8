"""builtin:digits_flow: the shipped flow-matching model, the real flow network the flow samplers are checked on.

Its guided samples through diffusers' own FlowMatchEulerDiscreteScheduler loop are digits the shipped classifier
reads; fastdiff's generate() equals that loop; the samplers of both frames give recognisable digits at few steps.
"""

import os

import pytest
import torch

import fastdiff
from fastdiff.checkpoints.presets import PRESET_DIR

FOLDER = os.path.join(PRESET_DIR, "digits_flow")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(FOLDER, "model.safetensors")),
                                reason=f"the builtin:digits_flow weights are absent ({FOLDER}/model.safetensors); "
                                       "train them with training/train_digits.py --objective flow")
pytest.importorskip("sklearn", reason="the digits classifier's features need scikit-learn")
LABELS = torch.arange(10).repeat_interleave(5)
SEEDS = list(range(50))


@pytest.fixture(scope="module")
def pipe():
    return fastdiff.load("builtin:digits_flow")


@torch.no_grad()
def diffusers_flow_euler(pipe, steps, cfg_scale):
    """diffusers' FlowMatchEulerDiscreteScheduler loop with CFG in one batched call, on the same latents."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.noise import NoiseSource

    sched = diffusers.FlowMatchEulerDiscreteScheduler(**{k: v for k, v in pipe.spec.scheduler.items()
                                                         if not k.startswith("_")})
    sched.set_timesteps(steps)
    x = NoiseSource(SEEDS).randn((1, 16, 16))
    y = torch.cat([LABELS, torch.full_like(LABELS, pipe.spec.null_class)])
    for t in sched.timesteps:
        out = pipe.model(torch.cat([x, x]), t.expand(2 * len(x)), class_labels=y)
        cond, uncond = out.chunk(2)
        x = sched.step(uncond + cfg_scale * (cond - uncond), t, x).prev_sample
    return x


def test_spec(pipe):
    spec = pipe.spec
    assert spec.prediction_type == "flow_prediction"
    assert spec.scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert spec.num_classes == 10 and spec.null_class == 10 and spec.sample_size == (16, 16)
    assert os.path.getsize(os.path.join(FOLDER, "model.safetensors")) <= 5 * 2 ** 20


def test_generate_equals_diffusers_flow_euler_and_reads_as_digits(pipe):
    from fastdiff.metrics import class_accuracy

    want = diffusers_flow_euler(pipe, 12, 3.0)
    got = pipe.generate(seeds=SEEDS, class_labels=LABELS, steps=12, cfg_scale=3.0, progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert class_accuracy(want.clamp(-1, 1), LABELS) >= 0.9


@pytest.mark.parametrize("sampler,steps", [("heun", 5), ("dpmpp_2m", 8), ("unipc", 8), ("euler_ancestral", 10)])
def test_samplers_of_both_frames_give_digits(pipe, sampler, steps):
    from fastdiff.metrics import class_accuracy

    x = pipe.generate(seeds=SEEDS, class_labels=LABELS, steps=steps, sampler=sampler, cfg_scale=3.0, progress=False)
    assert class_accuracy(x.clamp(-1, 1), LABELS) >= 0.9
