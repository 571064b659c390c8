"""``generate(padding_mask_crop=...)``: the box around the mask, the crop's resize to the output size, and the paste
back into the original image, each against diffusers' ``VaeImageProcessor``; whole runs against its inpainting
pipelines (a 9-channel inpainting UNet, a regular 4-channel one, FLUX.1) on the same weights and generators."""

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.errors import BadArgumentError
from fastdiff.mask_crop import MaskCrop, crop_region, resize_crop, resize_fill
from test_img2img import SD_SCHEDULER, SEEDS, sd_pair, sd_unet_vae_embeds

diffusers = pytest.importorskip("diffusers", reason="diffusers' image processor and pipelines are the reference")


def _processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=2)


def _mask(size, boxes) -> Image.Image:
    """An L mask of ``size`` (W, H), white (or the given level) in each box (x1, y1, x2, y2[, level])."""
    m = np.zeros(size[::-1], dtype=np.uint8)
    for x1, y1, x2, y2, *level in boxes:
        m[y1:y2, x1:x2] = level[0] if level else 255
    return Image.fromarray(m)


def _picture(size, seed=0) -> Image.Image:
    """A smooth RGB image of ``size`` (W, H) with some noise: Lanczos has edges and gradients to resample."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


# (image size (W, H), mask boxes, output (W, H), padding): wide and tall boxes, boxes at the edges (the grown side
# shifted back inside, or clipped), a one-pixel mask, a mask with soft levels, paddings past the image
CASES = [((40, 28), [(10, 8, 14, 20)], (16, 16), 4), ((40, 28), [(2, 5, 30, 9)], (16, 16), 0),
         ((40, 28), [(0, 0, 3, 3)], (16, 24), 2), ((40, 28), [(37, 20, 40, 28)], (24, 16), 5),
         ((33, 47), [(16, 23, 17, 24)], (16, 16), 3), ((33, 47), [(4, 30, 20, 46, 90), (10, 2, 12, 4, 1)], (20, 12), 6),
         ((20, 20), [(5, 5, 15, 15)], (16, 16), 100), ((64, 16), [(10, 2, 60, 14)], (16, 32), 1)]


@pytest.mark.parametrize("size, boxes, out, pad", CASES)
def test_the_crop_region_equals_diffusers(size, boxes, out, pad):
    mask = _mask(size, boxes)
    want = _processor().get_crop_region(mask, out[0], out[1], pad=pad)
    assert crop_region(mask, out[0], out[1], pad) == tuple(want)


@pytest.mark.parametrize("size, out", [((13, 9), (16, 16)), ((9, 13), (16, 16)), ((16, 16), (16, 16)),
                                       ((30, 10), (16, 24)), ((7, 21), (24, 16)), ((5, 5), (17, 11))])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_the_fill_and_crop_resizes_equal_diffusers(size, out, mode):
    """Both resize modes, wider and taller sources, odd sizes, gray masks and colour images: byte for byte."""
    image = _picture(size).convert(mode)
    p = _processor()
    assert np.array_equal(np.asarray(resize_fill(image, *out)), np.asarray(p._resize_and_fill(image, *out)))
    assert np.array_equal(np.asarray(resize_crop(image, *out)), np.asarray(p._resize_and_crop(image, *out)))


@pytest.mark.parametrize("size, boxes, out, pad", CASES[:4] + CASES[5:6])
def test_the_overlay_equals_diffusers(size, boxes, out, pad):
    """The result resized into the box, the original laid over it through the inverted (soft) mask: byte for byte."""
    image, mask = _picture(size), _mask(size, boxes)
    region = crop_region(mask, out[0], out[1], pad)
    results = [_picture(out, seed=s) for s in (1, 2)]
    crop = MaskCrop(original=image, original_mask=mask, region=region, image=None, mask=None)
    for got, result in zip(crop.overlay(results), results):
        want = _processor().apply_overlay(mask, image, result, region)
        assert got.size == image.size and np.array_equal(np.asarray(got), np.asarray(want))
    # the kept part is the original's, exactly; the repainted box is not
    got = np.asarray(crop.overlay(results)[0]).astype(int)
    keep = np.asarray(mask) == 0
    assert np.array_equal(got[keep], np.asarray(image).astype(int)[keep])
    assert np.abs(got[~keep] - np.asarray(image).astype(int)[~keep]).max() > 10


def _pil_inputs():
    size = (40, 28)
    return _picture(size, seed=7), _mask(size, [(12, 9, 19, 17), (20, 14, 23, 15, 140)])


def _each_seed_alone(run) -> list:
    """The reference images of a batch of SEEDS with one PIL image: diffusers' run of each seed alone,
    ``run(generators, rows)``. (Given one image for several seeds, diffusers' inpainting pipelines draw its posterior
    from the first generator alone; fastdiff encodes each sample's copy from its own, as that seed's solo run.)"""
    return [image for i, seed in enumerate(SEEDS) for image in run([torch.Generator().manual_seed(seed)],
                                                                   slice(i, i + 1))]


def _max_level_difference(a: list, b: list) -> int:
    return max(int(np.abs(np.asarray(x).astype(int) - np.asarray(y).astype(int)).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("in_channels, strength", [(9, 1.0), (4, 0.75)])
def test_sd_inpainting_with_a_padding_mask_crop_equals_diffusers(tmp_path, in_channels, strength):
    """StableDiffusionInpaintPipeline(padding_mask_crop=...) with an inpainting UNet and a regular one: the final PIL
    images (decoded crops pasted into the 40x28 original) within one level of 255."""
    parts = sd_unet_vae_embeds(in_channels=in_channels)
    pipe, ref = sd_pair(parts, tmp_path, diffusers.EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER),
                        "StableDiffusionInpaintPipeline", "StableDiffusionInpaintPipeline")
    e = parts[2]
    image, mask = _pil_inputs()
    want = _each_seed_alone(lambda g, rows: ref(
        image=image, mask_image=mask, padding_mask_crop=3, strength=strength, num_inference_steps=4, guidance_scale=3.0,
        prompt_embeds=e["prompt_embeds"][rows], negative_prompt_embeds=e["negative_prompt_embeds"][rows], generator=g,
        height=16, width=16, output_type="pil").images)
    kw = dict(steps=4, cfg_scale=3.0, seeds=SEEDS, encoder_hidden_states=e["prompt_embeds"], strength=strength,
              negative_encoder_hidden_states=e["negative_prompt_embeds"], progress=False, output_type="pil")
    got = pipe.generate(image=image, mask_image=mask, padding_mask_crop=3, **kw)  # (the model's size: 8x8 latents)
    assert [g.size for g in got] == [image.size] * 2
    assert _max_level_difference(got, want) <= 1
    # outside the mask the original stays; a wider padding inpaints another crop
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(got[0])[keep], np.asarray(image)[keep])
    wider = pipe.generate(image=image, mask_image=mask, padding_mask_crop=8, **kw)
    assert _max_level_difference(got, wider) > 5


def test_flux_inpainting_with_a_padding_mask_crop_equals_diffusers(tmp_path):
    """FluxInpaintPipeline(padding_mask_crop=...) at a non-square output size (its crop grown to that ratio)."""
    from test_inpaint_blending import _flux_pair

    import inspect

    pipe, ref = _flux_pair(tmp_path, "FluxInpaintPipeline", "FluxPipeline")
    if "apply_overlay" not in inspect.getsource(type(ref).__call__):
        pytest.skip(f"diffusers {diffusers.__version__}'s FluxInpaintPipeline returns the crop without pasting it "
                    f"back (no apply_overlay): no reference")
    g = torch.Generator().manual_seed(2)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    image, mask = _pil_inputs()
    want = _each_seed_alone(lambda g, rows: ref(
        image=image, mask_image=mask, padding_mask_crop=2, num_inference_steps=5, height=16, width=24,
        prompt_embeds=ctx[rows], pooled_prompt_embeds=pooled[rows], generator=g, output_type="pil").images)
    got = pipe.generate(image=image, mask_image=mask, padding_mask_crop=2, steps=5, height=8, width=12, seeds=SEEDS,
                        encoder_hidden_states=ctx, text_embeds=pooled, progress=False, output_type="pil")
    assert _max_level_difference(got, want) <= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(padding_mask_crop=-1), "an int >= 0"), (dict(padding_mask_crop=2.5), "an int >= 0"),
    (dict(padding_mask_crop=2, output_type="tensor"), "expected 'pil'"),
    (dict(padding_mask_crop=2, image=torch.rand(1, 3, 28, 40)), "image: padding_mask_crop .* found Tensor"),
    (dict(padding_mask_crop=2, mask_image=Image.new("L", (40, 28))), "all black"),
    (dict(padding_mask_crop=2, mask_image=Image.new("L", (20, 28), 255)), "expected the image's size"),
    (dict(padding_mask_crop=2, mask_image=None), "mask_image: padding_mask_crop .* found NoneType")])
def test_bad_padding_mask_crops_are_refused_by_name(tmp_path, kwargs, match):
    parts = sd_unet_vae_embeds()
    pipe, _ = sd_pair(parts, tmp_path, diffusers.DDIMScheduler.from_config(SD_SCHEDULER))
    image, mask = _pil_inputs()
    with pytest.raises(BadArgumentError, match=match):
        pipe.generate(**{**dict(image=image, mask_image=mask, steps=2, output_type="pil", progress=False,
                                encoder_hidden_states=parts[2]["prompt_embeds"][:1]), **kwargs})


def test_a_pixel_model_crops_at_its_own_resolution():
    """No VAE: the crop is resized to the model's sample size in pixels, inpainted and pasted back at the image's
    size, the unmasked pixels the image's own."""
    pipe = fastdiff.load("arch:tiny-unet")
    assert pipe.spec.in_channels == 3
    image, mask = _pil_inputs()
    kw = dict(image=image, mask_image=mask, steps=2, seeds=[0], output_type="pil", progress=False)
    got = pipe.generate(padding_mask_crop=2, **kw)[0]
    assert got.size == image.size
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(got)[keep], np.asarray(image)[keep])
    assert np.abs(np.asarray(got).astype(int) - np.asarray(image))[~keep].max() > 10


def test_controlnet_inpainting_crops_the_control_image_as_diffusers(tmp_path):
    """StableDiffusionControlNetInpaintPipeline(padding_mask_crop=...): the control image is cropped and resized with
    the image, to the size given or (its default) the image's own, rounded down to whole latent pixels (41x29 ->
    40x28 pixels here); a control image of another size (or a tensor) is refused by name."""
    from test_controlnet import _controlnet_inpaint_pair

    pipe, ref, e = _controlnet_inpaint_pair(tmp_path, "DDIMScheduler", in_channels=4)
    image, mask = _picture((41, 29), seed=7), _mask((41, 29), [(12, 9, 19, 17), (20, 14, 23, 15, 140)])
    control = _picture(image.size, seed=9)
    kw = dict(image=image, mask_image=mask, padding_mask_crop=3, steps=4, cfg_scale=3.0, seeds=SEEDS,
              encoder_hidden_states=e["prompt_embeds"], negative_encoder_hidden_states=e["negative_prompt_embeds"],
              progress=False, output_type="pil")
    for size in ({}, dict(height=16, width=24), dict(height=24)):
        want = _each_seed_alone(lambda g, rows: ref(
            image=image, mask_image=mask, control_image=control, padding_mask_crop=3, num_inference_steps=4,
            guidance_scale=3.0, prompt_embeds=e["prompt_embeds"][rows], generator=g, output_type="pil",
            negative_prompt_embeds=e["negative_prompt_embeds"][rows], **size).images)
        got = pipe.generate(control_image=control, **kw, **{k: v // 2 for k, v in size.items()})  # (latent px)
        assert _max_level_difference(got, want) <= 1
    assert _max_level_difference(got, pipe.generate(control_image=_picture(image.size, seed=10), **kw)) > 5
    for bad, found in ((control.resize((20, 14)), r"found a PIL image of \(14, 20\)"), (torch.rand(1, 3, 28, 40),
                                                                                       "found Tensor")):
        with pytest.raises(BadArgumentError, match="control_image: padding_mask_crop crops it with the image.*" + found):
            pipe.generate(control_image=bad, **kw)


def test_cli_generate_with_a_padding_mask_crop_writes_the_pasted_image(tmp_path):
    """``fastdiff generate MODEL --image IN.png --mask MASK.png --padding-mask-crop 2`` writes generate()'s PIL
    result, at the image's own size; its mistakes are one line and exit 2."""
    from test_cli import fastdiff as run_cli
    from test_inpaint import unconditional_inpainting_folder

    folder, _, _ = unconditional_inpainting_folder(tmp_path, 4)
    image, mask = _pil_inputs()  # (40x28, larger than the model's 16x16 pixels)
    image.save(tmp_path / "big.png")
    mask.save(tmp_path / "bigmask.png")
    args = ["generate", folder, "--image", "big.png", "--mask", "bigmask.png", "--steps", "3", "--n", "1", "--seed",
            "7", "--no-progress"]
    r = run_cli(*args, "--padding-mask-crop", "2", "--separate", "-o", "out.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = fastdiff.load(folder).generate(image=image, mask_image=mask, padding_mask_crop=2, steps=3, seeds=[7],
                                          output_type="pil", progress=False)[0]
    with Image.open(tmp_path / "out_0.png") as written:
        assert written.size == image.size and np.array_equal(np.asarray(written), np.asarray(want))
    for extra, match in ((["--output-latents", "l.safetensors"], "--output-latents: the latents of a"),
                         (["--padding-mask-crop", "-1"], "an int >= 0")):
        r = run_cli(*args, *(extra if extra[0] == "--padding-mask-crop" else ["--padding-mask-crop", "2", *extra]),
                    cwd=tmp_path)
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", folder, "--padding-mask-crop", "2", "--steps", "2", cwd=tmp_path)
    assert r.returncode == 2 and "--padding-mask-crop: given without --mask" in r.stderr


def test_the_engine_refuses_a_padding_mask_crop_by_name():
    """Engine requests resolve to tensors: a crop (pasted into a PIL image) is refused on its own future; a NumPy
    integer padding is a padding."""
    pipe = fastdiff.load("arch:tiny-unet")
    image, mask = _pil_inputs()
    with fastdiff.Engine(pipe, max_batch=2, max_wait_ms=1) as engine:
        future = engine.submit(seed=0, image=image, mask_image=mask, padding_mask_crop=2, steps=2)
        with pytest.raises(BadArgumentError, match="padding_mask_crop: not through the Engine"):
            future.result(timeout=60)
    got = pipe.generate(image=image, mask_image=mask, padding_mask_crop=np.int64(2), steps=2, seeds=[0],
                        output_type="pil", progress=False)
    assert np.array_equal(np.asarray(got[0]), np.asarray(pipe.generate(
        image=image, mask_image=mask, padding_mask_crop=2, steps=2, seeds=[0], output_type="pil", progress=False)[0]))
