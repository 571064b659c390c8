"""guided-diffusion's UNetModel and its SuperResModel (the 64 -> 256 / 128 -> 512 upsamplers) against a transcription of
the official code (``adm_reference``): the loader, and super-resolution sampling (``generate(image=LOW_RES)``), with no
fixture needed."""

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from adm_reference import SuperResModel, UNetModel, randomized
from fastdiff.errors import BadArgumentError
from fastdiff.noise import NoiseSource
from test_sampler_order import single_thread  # noqa: F401  (autouse fixture)

BASE = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=2,
            attention_resolutions=(2, 4), channel_mult=(1, 1, 2), num_head_channels=16)


def _save(model, tmp_path, name="model.pt") -> str:
    path = str(tmp_path / name)
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("kw,load_kw", [
    (dict(num_classes=10), dict(head_channels=16)),
    (dict(use_new_attention_order=True, num_heads=2, num_head_channels=-1), dict(num_heads=2, attention_order="new")),
    (dict(channel_mult=(0.5, 1, 2), model_channels=64, out_channels=3), dict(head_channels=16)),
    (dict(resblock_updown=False, num_classes=10), dict(head_channels=16)),
    (dict(resblock_updown=False, use_scale_shift_norm=False, channel_mult=(1, 2), attention_resolutions=(2,)),
     dict(head_channels=16)),
], ids=["class-conditional", "new-order-num-heads", "half-width-first-level", "conv-resampling",
        "conv-resampling-no-scale-shift"])
def test_unet_matches_official(kw, load_kw, tmp_path):
    ref = randomized(UNetModel(**dict(BASE, **kw)), 1)
    pipe = fastdiff.load(_save(ref, tmp_path), **load_kw)
    assert pipe.spec.low_res_channels is None and pipe.spec.in_channels == 3
    assert pipe.spec.learned_variance == (ref.out[-1].out_channels == 6)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 900])
    y = torch.tensor([1, 7]) if "num_classes" in kw else None
    with torch.no_grad():
        want = ref(x, t, y)
        got = pipe.model(x, t, class_labels=y)
    assert float(want.abs().max()) > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.fixture
def upsampler(tmp_path):
    ref = randomized(SuperResModel(**dict(BASE, num_classes=10)), 2)
    return ref, fastdiff.load(_save(ref, tmp_path, "64_256_upsampler.pt"), head_channels=16)


def test_upsampler_loads_as_a_super_resolution_model(upsampler):
    ref, pipe = upsampler
    spec = pipe.spec
    assert (spec.in_channels, spec.low_res_channels, spec.learned_variance) == (3, 3, True)
    assert any("super-resolution" in n for n in pipe.notes)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    low = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(2)) * 2 - 1  # (any size, odd too)
    t, y = torch.tensor([10, 500]), torch.tensor([2, 3])
    up = F.interpolate(low, (16, 16), mode="bilinear")
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x, t, class_labels=y, image_latents=up), ref(x, t, low_res=low, y=y),
                                   rtol=1e-5, atol=2e-5)


def test_generate_upsamples_the_image_as_super_res_sample(upsampler):
    """generate(image=LOW_RES): the network reads the image in [-1, 1] upsampled bilinearly to the output size beside
    each step's sample (super_res_sample.py's model_kwargs["low_res"]); one image per sample or one for all."""
    ref, pipe = upsampler
    low = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))  # [0, 1], as generate() takes images
    labels, seeds = [4, 1], [7, 8]
    got = pipe.generate(image=low, class_labels=labels, seeds=seeds, steps=5, height=16, width=16, progress=False)
    assert got.shape == (2, 3, 16, 16)

    plan = pipe.plan(5, size=(16, 16))
    y = torch.tensor(labels)

    def official(x, t, class_labels=None):  # (its low_res in [-1, 1]: super_res_sample.py's / 127.5 - 1)
        return ref(x, t.expand(x.shape[0]), low_res=low * 2 - 1, y=class_labels)

    src = NoiseSource(seeds)
    with torch.no_grad():
        want = plan.sample(plan.make_denoiser(official), src.randn((3, 16, 16)), noise=src,
                           extra_args=dict(class_labels=y))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # another image gives another sample; one image serves every sample
    other = pipe.generate(image=1 - low, class_labels=labels, seeds=seeds, steps=5, height=16, width=16,
                          progress=False)
    assert float((other - got).abs().max()) > 1e-2
    shared = pipe.generate(image=low[:1], class_labels=labels, seeds=seeds, steps=5, height=16, width=16,
                           progress=False)
    torch.testing.assert_close(shared[0], got[0], rtol=1e-4, atol=1e-4)
    solo = pipe.generate(image=low[:1], class_labels=labels[1:], seeds=seeds[1:], steps=5, height=16, width=16,
                         progress=False)
    torch.testing.assert_close(shared[1], solo[0], rtol=1e-4, atol=1e-4)  # (the image reaches every row)
    # one sample per image by default
    assert pipe.generate(image=low, class_labels=labels, steps=2, height=16, width=16, progress=False).shape[0] == 2


def test_super_resolution_refusals(upsampler):
    _, pipe = upsampler
    kw = dict(class_labels=[1], steps=2, height=16, width=16, progress=False)
    with pytest.raises(BadArgumentError, match="super-resolution model.*expected image="):
        pipe.generate(**kw)
    low = torch.rand(1, 3, 4, 4)
    with pytest.raises(BadArgumentError, match="strength"):
        pipe.generate(image=low, strength=0.5, **kw)
    with pytest.raises(BadArgumentError, match="mask_image"):
        pipe.generate(image=low, mask_image=torch.ones(1, 1, 4, 4), **kw)
    with pytest.raises(BadArgumentError, match="one per sample"):
        pipe.generate(image=torch.rand(3, 3, 4, 4), seeds=[1, 2], class_labels=[1, 2], steps=2, height=16,
                      width=16, progress=False)


def test_engine_batches_super_resolution_requests(upsampler):
    _, pipe = upsampler
    lows = [torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=500) as engine:
        # (DDIM: DDPM's clipped, learned-range draws turn batch-size rounding into 1e-4 differences)
        futures = [engine.submit(seed=i, class_label=i, image=low, steps=3, sampler="ddim")
                   for i, low in enumerate(lows)]
        bad = engine.submit(seed=9, class_label=1, steps=3)  # (no image: fails alone)
        got = [f.result(timeout=120) for f in futures]
        with pytest.raises(BadArgumentError, match="expected image="):
            bad.result(timeout=60)
        assert max(engine.stats()["batch_size_hist"]) > 1  # (they shared a generate call)
    for i, (low, out) in enumerate(zip(lows, got)):
        solo = pipe.generate(seeds=[i], class_labels=[i], image=low[None], steps=3, sampler="ddim",
                             progress=False)[0]
        torch.testing.assert_close(out, solo, rtol=1e-4, atol=1e-4)
    # images of other sizes share a batch for one output size (each upsampled at submit)
    mixed = [torch.rand(3, s, s, generator=torch.Generator().manual_seed(s)) for s in (4, 8, 5)]
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=500) as engine:
        futures = [engine.submit(seed=i, class_label=i, image=low, steps=2, sampler="ddim", height=16, width=16)
                   for i, low in enumerate(mixed)]
        got = [f.result(timeout=120) for f in futures]
        assert max(engine.stats()["batch_size_hist"]) > 1
    for i, (low, out) in enumerate(zip(mixed, got)):
        solo = pipe.generate(seeds=[i], class_labels=[i], image=low[None], steps=2, sampler="ddim", height=16,
                             width=16, progress=False)[0]
        torch.testing.assert_close(out, solo, rtol=1e-4, atol=1e-4)


def test_upsampler_survives_save_and_onnx_export(upsampler, tmp_path):
    """The fastdiff format and an exported ONNX graph keep the low-resolution input (``image_latents``): both
    upsample as the eager model does."""
    _, pipe = upsampler
    low = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    kw = dict(image=low, class_labels=[6], seeds=[3], steps=3, height=16, width=16, progress=False)
    want = pipe.generate(**kw)
    saved = fastdiff.load(pipe.save(str(tmp_path / "saved")))
    assert saved.spec.low_res_channels == 3
    torch.testing.assert_close(saved.generate(**kw), want)
    pytest.importorskip("onnxruntime", reason="the exported graph runs on ONNX Runtime")
    pytest.importorskip("onnx", reason="the exporter needs onnx")
    from fastdiff.export.onnx import export_onnx

    path = str(tmp_path / "upsampler.onnx")
    export_onnx(pipe, pipe.spec, path, progress=False, height=16, width=16)
    graph = fastdiff.load(path)
    assert graph.spec.low_res_channels == 3
    torch.testing.assert_close(graph.generate(**kw), want, rtol=1e-4, atol=1e-4)


def test_cli_upsamples_an_image(upsampler, tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli

    ref, _ = upsampler
    path = _save(ref, tmp_path, "up.pt")
    pixels = (np.random.default_rng(0).random((4, 4, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "low.png")
    r = run_cli("generate", path, "--head-channels", "16", "--image", "low.png", "--class", "5", "--n", "1",
                "--steps", "2", "--height", "16", "--width", "16", "--output-latents", "out.safetensors",
                "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pipe = fastdiff.load(path, head_channels=16)
    want = pipe.generate(image=Image.open(tmp_path / "low.png"), class_labels=[5], seed=0, steps=2, height=16,
                         width=16, progress=False)
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["latents"], want)


def test_upsampler_defaults_are_super_res_samples(upsampler):
    """With no size, the output is 4x the image (both released upsamplers); with no sampler, super_res_sample.py's
    p_sample_loop: DDPM on the respaced timesteps, the learned range, x0 clipped."""
    _, pipe = upsampler
    plan = pipe.plan(25)
    assert (plan.sampler, plan.options["variance"], plan.denoiser_options["clip_sample"]) == \
        ("ddpm", "learned_range", 1.0)
    out = pipe.generate(image=torch.rand(1, 3, 4, 6), class_labels=[1], steps=2, progress=False)
    assert out.shape == (1, 3, 16, 24)
    for kw, name in ((dict(denoising_start=0.5), "denoising_start"), (dict(padding_mask_crop=2), "padding_mask_crop")):
        with pytest.raises(BadArgumentError, match=f"{name}: a super-resolution model's image is its conditioning"):
            pipe.generate(image=torch.rand(1, 3, 4, 4), class_labels=[1], steps=2, progress=False, **kw)


def test_six_channel_models_and_released_head_counts(tmp_path, monkeypatch):
    """super_res=False loads a 6-input-channel ADM as a plain model; a layout of a released checkpoint trained with a
    head count (128x128_diffusion.pt, 64_256_upsampler.pt) loads with it, which 64 channels per head would split
    otherwise without an error."""
    from fastdiff.checkpoints import guided_diffusion

    plain = randomized(UNetModel(**dict(BASE, in_channels=6, out_channels=6)), 4)
    pipe = fastdiff.load(_save(plain, tmp_path, "six.pt"), head_channels=16, super_res=False)
    assert (pipe.spec.in_channels, pipe.spec.low_res_channels) == (6, None)
    assert pipe.generate(n=1, steps=2, progress=False).shape == (1, 6, 64, 64)
    with pytest.raises(BadArgumentError, match="super_res=True"):
        fastdiff.load(_save(randomized(UNetModel(**BASE), 4), tmp_path, "three.pt"), head_channels=16,
                      super_res=True)
    with pytest.raises(BadArgumentError, match="super_res= does not apply"):
        fastdiff.load("arch:tiny-unet", super_res=False)

    heads = randomized(SuperResModel(**dict(BASE, model_channels=64, num_heads=4, num_head_channels=-1,
                                            num_classes=10)), 5)
    path = _save(heads, tmp_path, "heads.pt")
    x, t, y = torch.randn(1, 3, 16, 16), torch.tensor([300]), torch.tensor([2])
    low = torch.rand(1, 3, 4, 4) * 2 - 1
    up = F.interpolate(low, (16, 16), mode="bilinear")
    with torch.no_grad():
        want = heads(x, t, low_res=low, y=y)
        split64 = fastdiff.load(path).model(x, t, class_labels=y, image_latents=up)  # 1, 1, 2 heads: not the trained
        assert float((split64 - want).abs().max()) > 1e-3
        monkeypatch.setitem(guided_diffusion._RELEASED_NUM_HEADS, ((64, 64, 128), 6, (False, True, True)),
                            (4, "a released upsampler"))
        pipe = fastdiff.load(path)
        assert any("a released upsampler" in n and "num_heads=4" in n for n in pipe.notes)
        torch.testing.assert_close(pipe.model(x, t, class_labels=y, image_latents=up), want, rtol=1e-5, atol=2e-5)
        pinned = fastdiff.load(path, head_channels=64)  # (an explicit split wins)
        assert float((pinned.model(x, t, class_labels=y, image_latents=up) - want).abs().max()) > 1e-3


def test_improved_diffusion_checkpoint_samples_as_its_image_sample(tmp_path):
    """openai/improved-diffusion's networks are ADM's with conv resampling and a head count; its 4000-step cosine
    models (scheduler=IMPROVED_DIFFUSION_SCHEDULER, --scheduler improved-diffusion) sample as its image_sample.py:
    p_sample on the respaced timesteps, x0 clipped, the learned range, the network reading t * 1000 / 4000."""
    from fastdiff.checkpoints.presets import IMPROVED_DIFFUSION_SCHEDULER
    from fastdiff.schedules import make_alphas_cumprod
    from test_guided_diffusion_sampling import _cosine_betas, _guided_diffusion_p_sample_loop

    ref = randomized(UNetModel(**dict(BASE, resblock_updown=False, num_heads=4, num_head_channels=-1)), 6)
    pipe = fastdiff.load(_save(ref, tmp_path, "cifar10_uncond.pt"), num_heads=4,
                         scheduler=IMPROVED_DIFFUSION_SCHEDULER)
    plan = pipe.plan(10)
    assert (plan.sampler, plan.options["variance"], plan.denoiser_options["timestep_scale"]) == \
        ("ddpm", "learned_range", 0.25)
    fed = []

    def split(x, t):
        fed.append(float(t))
        with torch.no_grad():
            out = ref(x, torch.full((x.shape[0],), float(t)))
        return out[:, :3], out[:, 3:]

    # the algorithm on fastdiff's table (diffusers' float32 alphas_cumprod), and the official float64 one: 4000 cosine
    # steps put alphas_cumprod at 1.5e-10 at the top, whose float32 rounding shows where x0 meets the clipping
    ac = make_alphas_cumprod("squaredcos_cap_v2", 4000).double()
    table = (1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])).numpy()
    got = pipe.generate(seeds=[3, 4], steps=10, height=16, width=16, progress=False)
    for betas, tol in ((table, 2e-5), (_cosine_betas(4000), 2e-3)):
        fed.clear()
        want, _ = _guided_diffusion_p_sample_loop(split, 10, [3, 4], (3, 16, 16), clip=True, betas=betas,
                                                  timestep_scale=0.25)
        assert fed[0] == 3999 * 0.25 and fed[-1] == 0.0
        assert float((got - want.float()).abs().max()) <= tol * float(want.abs().max())
    # every sampler and grid reads the scaled timesteps (t <= 3999 * 0.25); SDXL-style cutoffs count training steps
    for sampler, schedule in (("euler", None), ("dpmpp_2m", "karras"), ("ddim", "trailing"), ("ddpm", "karras")):
        fed.clear()
        named = pipe.plan(6, sampler, schedule)
        assert named.denoiser_options["timestep_scale"] == 0.25
        named.sample(named.make_denoiser(lambda x, t, **kw: torch.cat(split(x, t.reshape(-1)[0]), dim=1)),
                     torch.randn(1, 3, 16, 16))
        assert max(fed) <= 3999 * 0.25
    from fastdiff import experts

    assert experts.steps_until(plan, 0.5, 4000) == (5, False)  # (t >= 2000 of 10 respaced steps: 3999 ... 2222)
    unscaled = fastdiff.load(_save(ref, tmp_path, "again.pt"), num_heads=4,
                             scheduler=dict(IMPROVED_DIFFUSION_SCHEDULER, timestep_scale=None))
    assert float((unscaled.generate(seeds=[3, 4], steps=10, height=16, width=16, progress=False) - got).abs().max()) \
        > 1e-3  # (the scale reaches the network)


def test_conv_resampling_defaults_and_refusals(tmp_path):
    """A conv-resampling model (script_util's defaults) assumes num_heads=4; improved-diffusion's CIFAR-10 layout
    defaults to 32 px; average-pool resampling is refused by name; timestep_scale is refused where nothing reads it."""
    from fastdiff.errors import CheckpointError, UnsupportedConfigError
    from fastdiff.scheduler_config import plan_from_scheduler_config

    ref = randomized(UNetModel(**dict(BASE, model_channels=64, resblock_updown=False, num_heads=4,
                                      num_head_channels=-1)), 7)
    pipe = fastdiff.load(_save(ref, tmp_path, "heads.pt"))
    assert any("num_heads=4 assumed" in n for n in pipe.notes)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x, t), ref(x, t), rtol=1e-5, atol=2e-5)
    cifar = randomized(UNetModel(**dict(BASE, channel_mult=(1, 2, 2, 2), resblock_updown=False, num_heads=4,
                                        num_head_channels=-1)), 8)
    assert fastdiff.load(_save(cifar, tmp_path, "cifar.pt")).spec.sample_size == (32, 32)
    pooled = randomized(UNetModel(**dict(BASE, resblock_updown=False, conv_resample=False)), 9)
    with pytest.raises(CheckpointError, match="average-pool resampling"):
        fastdiff.load(_save(pooled, tmp_path, "pooled.pt"), head_channels=16)
    for name in ("FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler"):
        with pytest.raises(UnsupportedConfigError, match="timestep_scale"):
            plan_from_scheduler_config({"_class_name": name, "timestep_scale": 0.25}, 4)
    # a bad value, or one no run reads, is refused at load (named samplers read the key too)
    for scheduler, error in ((dict(_class_name="DDPMScheduler", timestep_scale=-1.0), BadArgumentError),
                             (dict(_class_name="DDPMScheduler", timestep_scale="0.25"), UnsupportedConfigError),
                             (dict(_class_name="FlowMatchEulerDiscreteScheduler", timestep_scale=0.25),
                              UnsupportedConfigError)):
        with pytest.raises(error, match="timestep_scale"):
            fastdiff.load("arch:tiny-unet", scheduler=scheduler)


def test_released_layouts_tell_their_head_splits_apart():
    """OpenAI's two upsamplers share their widths; 64_256 was trained with num_heads=4 (attention at 32, 16, 8 px),
    128_512 with 64 channels per head (attention at 32, 16): the attention levels tell them apart (shapes only, on
    the meta device)."""
    from fastdiff.checkpoints.guided_diffusion import released_num_heads

    flags = dict(in_channels=3, model_channels=192, out_channels=6, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
                 num_classes=1000)
    with torch.device("meta"):
        up64 = SuperResModel(256, attention_resolutions=(8, 16, 32), num_heads=4, num_head_channels=-1, **flags)
        up128 = SuperResModel(512, attention_resolutions=(16, 32), num_head_channels=64, **flags)
        base128 = UNetModel(128, 3, 256, 6, 2, (4, 8, 16), (1, 1, 2, 3, 4), num_classes=1000, num_heads=4)
    assert released_num_heads(up64.state_dict())[0] == 4
    assert released_num_heads(up128.state_dict()) is None
    assert released_num_heads(base128.state_dict())[0] == 4
