"""fastdiff.load on NVlabs/edm checkpoints + generate() with EDM's Heun sampler reproduce edm_sampler."""

import os

import pytest
import torch
from safetensors.torch import load_file

import fastdiff

FIXTURES = os.environ.get("FASTDIFF_FIXTURES",
                          os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))
EDM = os.path.join(FIXTURES, "edm")


@pytest.mark.parametrize("name", ["song", "dhariwal"])
def test_load_and_generate_match_official_heun(name):
    if not os.path.isdir(EDM):
        pytest.skip(f"reference fixture {EDM} not present")
    ref = load_file(os.path.join(EDM, "reference.safetensors"))
    pipe = fastdiff.load(os.path.join(EDM, f"edm_{name}.pt"))
    assert pipe.spec.kind == "edm" and pipe.spec.prediction_type == "edm"
    plan = pipe.plan(6)
    assert plan.sampler == "edm"
    torch.testing.assert_close(plan.sigmas, ref["sampler_t_steps"], rtol=1e-6, atol=1e-9)
    out = pipe.generate(latents=ref["sampler_latents"], class_labels=ref["sampler_class_labels"].argmax(1), steps=6,
                        progress=False)
    torch.testing.assert_close(out, ref[f"{name}_sample"], rtol=0, atol=1e-4)
