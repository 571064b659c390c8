"""``fastdiff bench --compare diffusers`` rebuilds the same weights as a diffusers model: the rebuilt model must
be the same network (same outputs), or the comparison times something else."""

import pytest
import torch

import fastdiff
from helpers import rel_err

pytest.importorskip("diffusers", reason="diffusers is needed for the comparison")


@pytest.mark.parametrize("arch", ["tiny-unet", "tiny-sd-unet", "tiny-sdxl-unet", "tiny-dit"])
def test_diffusers_counterpart_holds_the_same_network(arch):
    from fastdiff.commands.bench import build_diffusers_model

    pipe = fastdiff.load(f"arch:{arch}")
    for p in pipe.model.parameters():  # random weights everywhere (some inits are zero)
        p.data.normal_(0, 0.05)
    model, note = build_diffusers_model(pipe)
    spec = pipe.spec
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, spec.in_channels) + tuple(spec.sample_size), generator=g)
    t = torch.tensor([10.0, 500.0])
    kw, dkw = {}, {}
    if spec.num_classes:
        kw["class_labels"] = dkw["class_labels"] = torch.tensor([1, 3])
    if spec.cross_attention_dim:
        kw["encoder_hidden_states"] = dkw["encoder_hidden_states"] = torch.randn(2, 7, spec.cross_attention_dim,
                                                                                generator=g)
    if spec.time_ids_dim:  # SDXL: diffusers takes the pooled text and ids as added_cond_kwargs
        kw["text_embeds"] = torch.randn(2, spec.text_embeds_dim, generator=g)
        kw["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96.0, 64, 8, 0, 64, 64]])
        dkw["added_cond_kwargs"] = dict(text_embeds=kw["text_embeds"], time_ids=kw["time_ids"])
    with torch.no_grad():
        want = pipe.model(x, t, **kw)
        got = model(x, t, **dkw).sample
    if note:  # DiT: diffusers embeds timesteps with another frequency shift; same shapes and FLOPs
        assert "frequency shift" in note and got.shape == want.shape
    else:
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("schedule", [None, "trailing", "leading"])
def test_the_diffusers_comparison_samples_on_fastdiffs_grid(schedule):
    """The diffusers side of the comparison runs the grid fastdiff runs for the same --schedule (the checkpoint's own
    spacing by default), so both time the same timesteps. (--schedule karras sets diffusers' use_karras_sigmas, whose
    range is the model's own: same NFE, other sigmas.)"""
    from types import SimpleNamespace

    import numpy as np

    from fastdiff.commands.bench import _diffusers_sampler, _import_diffusers

    pipe = fastdiff.load("builtin:digits")
    args = SimpleNamespace(sampler="euler", schedule=schedule)
    scheduler, note = _diffusers_sampler(args, pipe.spec, _import_diffusers())
    assert note is None
    scheduler.set_timesteps(8)
    ours = pipe.plan(8, "euler", schedule).sigmas
    np.testing.assert_allclose(np.asarray(scheduler.sigmas, dtype=np.float64), ours.double().numpy(), rtol=1e-5)


def test_the_diffusers_comparison_takes_karras_where_its_scheduler_has_it():
    from types import SimpleNamespace

    from fastdiff.commands.bench import _diffusers_sampler, _import_diffusers

    spec = fastdiff.load("builtin:digits").spec
    scheduler, note = _diffusers_sampler(SimpleNamespace(sampler="dpmpp_2m", schedule="karras"), spec,
                                         _import_diffusers())
    assert scheduler.config.use_karras_sigmas and note is None
    scheduler, note = _diffusers_sampler(SimpleNamespace(sampler="ddim", schedule="karras"), spec, _import_diffusers())
    assert "has no karras grid" in note
