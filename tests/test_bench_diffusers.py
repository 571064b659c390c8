"""``fastdiff bench --compare diffusers`` rebuilds the same weights as a diffusers model: the rebuilt model must
be the same network (same outputs), or the comparison times something else."""

import pytest
import torch

import fastdiff
from helpers import rel_err

pytest.importorskip("diffusers", reason="diffusers is needed for the comparison")


@pytest.mark.parametrize("arch", ["tiny-unet", "tiny-sd-unet", "tiny-sdxl-unet", "tiny-dit"])
def test_diffusers_counterpart_holds_the_same_network(arch):
    from fastdiff.commands.bench_diffusers import build_diffusers_model

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

    from fastdiff.commands.bench_diffusers import _diffusers_sampler, _import_diffusers

    pipe = fastdiff.load("builtin:digits")
    args = SimpleNamespace(sampler="euler", schedule=schedule)
    scheduler, note = _diffusers_sampler(args, pipe.spec, _import_diffusers())
    assert note is None
    scheduler.set_timesteps(8)
    ours = pipe.plan(8, "euler", schedule).sigmas
    np.testing.assert_allclose(np.asarray(scheduler.sigmas, dtype=np.float64), ours.double().numpy(), rtol=1e-5)


def test_the_diffusers_comparison_takes_karras_where_its_scheduler_has_it():
    from types import SimpleNamespace

    from fastdiff.commands.bench_diffusers import _diffusers_sampler, _import_diffusers

    spec = fastdiff.load("builtin:digits").spec
    scheduler, note = _diffusers_sampler(SimpleNamespace(sampler="dpmpp_2m", schedule="karras"), spec,
                                         _import_diffusers())
    assert scheduler.config.use_karras_sigmas and note is None
    scheduler, note = _diffusers_sampler(SimpleNamespace(sampler="ddim", schedule="karras"), spec, _import_diffusers())
    assert "has no karras grid" in note


@pytest.mark.parametrize("arch", ["tiny-sd-unet", "tiny-sdxl-unet"])
def test_bench_with_a_controlnet_times_the_same_networks_on_both_sides(arch, tmp_path):
    """``fastdiff bench --controlnet random``: the diffusers side's ControlNet (rebuilt from the config fastdiff
    writes) and its call equal fastdiff's ControlledUNet; the bench itself runs both sides."""
    import json
    from types import SimpleNamespace

    import diffusers

    from fastdiff.checkpoints.controlnet import diffusers_config
    from fastdiff.commands.bench_diffusers import _diffusers_generate, _diffusers_sampler, _import_diffusers, \
        build_diffusers_model
    from fastdiff.commands.bench_inputs import _conditioning, bench_controlnet
    from fastdiff.models.controlnet import ControlledUNet
    from test_cli import fastdiff as run_cli

    pipe = fastdiff.load(f"arch:{arch}")
    net = bench_controlnet(pipe, "random", 0)
    theirs = diffusers.ControlNetModel.from_config(
        {k: v for k, v in diffusers_config(net).items() if not k.startswith("_")})
    theirs.load_state_dict(net.state_dict())
    unet, _ = build_diffusers_model(pipe)
    spec = pipe.spec
    cond = _conditioning(spec, 2, 2.0, 0, "cpu", torch.float32, control=net)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn((2, spec.in_channels) + tuple(spec.sample_size), generator=g), torch.tensor([10.0, 500.0])
    kw, dkw = dict(encoder_hidden_states=cond["states"]), dict(encoder_hidden_states=cond["states"])
    if spec.time_ids_dim:
        kw.update(text_embeds=cond["text_embeds"], time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
        dkw["added_cond_kwargs"] = dict(text_embeds=kw["text_embeds"], time_ids=kw["time_ids"])
    with torch.no_grad():
        want = ControlledUNet(pipe.model, net)(x, t, control_image=cond["control_image"],
                                               control_scale=torch.ones(2), **kw)
        down, mid = theirs.eval()(x, t, controlnet_cond=cond["control_image"], conditioning_scale=1.0,
                                  return_dict=False, **dkw)  # (as _diffusers_generate calls them)
        got = unet(x, t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **dkw).sample
        plain = unet(x, t, **dkw).sample
    assert rel_err(got, want) <= 1e-5 and rel_err(got, plain) > 1e-3
    scheduler, _ = _diffusers_sampler(SimpleNamespace(sampler="ddim", schedule=None), spec, _import_diffusers())
    with torch.no_grad():  # the loop's ControlNet branch runs
        assert rel_err(_diffusers_generate(unet, scheduler, spec, 2, 2, 2.0, cond, "cpu", torch.float32, 0, theirs),
                       _diffusers_generate(unet, scheduler, spec, 2, 2, 2.0, cond, "cpu", torch.float32, 0)) > 1e-3
    if arch == "tiny-sd-unet":
        r = run_cli("bench", f"arch:{arch}", "--controlnet", "random", "--compare", "diffusers", "--steps", "2",
                    "--repeat", "1", "--warmup", "1", "--cfg", "2", "--json", "out.json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        rows = json.loads((tmp_path / "out.json").read_text())
        assert [row["status"] for row in rows["results"] + rows["compare"]] == ["ok", "ok"]
        r = run_cli("bench", "arch:tiny-dit", "--controlnet", "random", cwd=tmp_path)
        assert r.returncode == 2 and "a ControlNet drives a text-conditioned UNet" in r.stderr


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])
def test_official_dit_bench_builds_its_diffusers_scheduler(sampler):
    """An official DiT checkpoint's scheduler carries a learned variance and fastdiff's respacing key: diffusers' side
    is built without them (its loop drops the variance channels; DPM-Solver told to read them failed on 4 vs 3
    channels), and its run is the same as diffusers' DDPM / DPM-Solver on fixed variances."""
    from types import SimpleNamespace

    from conftest import fixture_path

    from fastdiff.commands.bench_diffusers import _diffusers_generate, _diffusers_sampler, _import_diffusers
    from fastdiff.commands.bench_diffusers import build_diffusers_model
    from fastdiff.commands.bench_inputs import _conditioning

    pipe = fastdiff.load(fixture_path("dit", "dit_tiny.pt"), num_heads=4)
    spec = pipe.spec
    assert spec.scheduler["variance_type"] == "learned_range" and spec.scheduler["timestep_respacing"]
    scheduler, _ = _diffusers_sampler(SimpleNamespace(sampler=sampler, schedule=None), spec, _import_diffusers())
    assert getattr(scheduler.config, "variance_type", None) in (None, "fixed_small")
    assert "timestep_respacing" not in scheduler.config
    model, _ = build_diffusers_model(pipe)
    cond = _conditioning(spec, 2, 4.0, 0, "cpu", torch.float32)
    with torch.no_grad():
        out = _diffusers_generate(model, scheduler, spec, 2, 3, 4.0, cond, "cpu", torch.float32, 0)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
