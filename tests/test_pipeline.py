"""Pipeline.generate: per-sample seeds, official DiT sampling fixtures, conditioning errors, outputs."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import rel_err

FIXTURES = os.environ.get("FASTDIFF_FIXTURES",
                          os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))

# official DiT's create_diffusion(timestep_respacing="ddim10"): DDIM on t = 900, 800, ..., 0, alpha_prev = 1
DIT_DDIM10 = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
              "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": False,
              "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading"}


@pytest.fixture(scope="module")
def tiny_unet():
    return fastdiff.load("arch:tiny-unet")


@pytest.fixture(scope="module")
def dit_fixture():
    path = os.path.join(FIXTURES, "dit", "dit_tiny.pt")
    if not os.path.exists(path):
        pytest.skip(f"reference fixture {path} not present")
    pipe = fastdiff.load(path, scheduler=DIT_DDIM10, num_heads=4)  # config.json: num_heads=4
    return pipe, load_file(os.path.join(FIXTURES, "dit", "reference.safetensors"))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc", "euler_ancestral", "dpmpp_2m_sde", "ddpm"])
def test_batch_equals_single_runs(tiny_unet, sampler):
    seeds = [11, 22, 33, 44]
    batch = tiny_unet.generate(seeds=seeds, steps=4, sampler=sampler, progress=False)
    for i, s in enumerate(seeds):
        solo = tiny_unet.generate(seeds=[s], steps=4, sampler=sampler, progress=False)
        assert rel_err(batch[i:i + 1], solo) <= 1e-5


def test_seed_means_consecutive_seeds_and_latents_override(tiny_unet):
    a = tiny_unet.generate(n=2, seed=5, steps=3, sampler="euler", progress=False)
    b = tiny_unet.generate(seeds=[5, 6], steps=3, sampler="euler", progress=False)
    assert torch.equal(a, b)
    z = torch.randn(2, 3, 16, 16)
    c = tiny_unet.generate(latents=z, steps=3, sampler="euler", progress=False)
    d = tiny_unet.generate(latents=z, steps=3, sampler="euler", progress=False)
    assert torch.equal(c, d) and not torch.equal(c, a)


def test_official_dit_ddim_fixture(dit_fixture):
    pipe, ref = dit_fixture
    out = pipe.generate(latents=ref["ddim_noise"], class_labels=ref["ddim_y"], steps=10, progress=False)
    want = ref["ddim_sample"]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_official_dit_ddim_cfg_fixture(dit_fixture):
    """Official sample.py doubles the batch; its rows 0-1 are the guided samples (3-channel CFG)."""
    pipe, ref = dit_fixture
    z = ref["ddim_cfg_noise"][:2]
    out = pipe.generate(latents=z, class_labels=ref["ddim_cfg_y"][:2], cfg_scale=4.0, steps=10, progress=False)
    want = ref["ddim_cfg_sample"][:2]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_output_types(tiny_unet):
    arr = tiny_unet.generate(seeds=[1, 2], steps=2, sampler="euler", output_type="np", progress=False)
    assert arr.shape == (2, 16, 16, 3) and arr.dtype == np.uint8
    imgs = tiny_unet.generate(seeds=[1], steps=2, sampler="euler", output_type="pil", progress=False)
    assert imgs[0].size == (16, 16) and imgs[0].mode == "RGB"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(steps=0), "steps"),
    (dict(sampler="nope"), "sampler"),
    (dict(schedule="nope", sampler="euler"), "schedule"),
    (dict(output_type="gif"), "output_type"),
    (dict(class_labels=[1]), "not class-conditional"),
    (dict(cfg_scale=3.0), "conditional"),
    (dict(latents=torch.zeros(1, 4, 16, 16)), "latents"),
])
def test_bad_arguments(tiny_unet, kwargs, needle):
    with pytest.raises(BadArgumentError) as e:
        tiny_unet.generate(**{"steps": 2, "progress": False, **kwargs})
    assert needle in str(e.value)


def test_text_model_requires_states_and_negative_for_cfg():
    pipe = fastdiff.load("arch:tiny-sd-unet")
    with pytest.raises(BadArgumentError, match="encoder_hidden_states"):
        pipe.generate(steps=2, progress=False)
    ctx = torch.randn(1, 5, 32)
    with pytest.raises(BadArgumentError, match="negative_encoder_hidden_states"):
        pipe.generate(steps=2, encoder_hidden_states=ctx, cfg_scale=5.0, progress=False)
    out = pipe.generate(seeds=[1, 2], steps=2, encoder_hidden_states=ctx, negative_encoder_hidden_states=ctx * 0,
                        cfg_scale=5.0, progress=False)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_half_precision_network_keeps_float32_state(tiny_unet):
    pipe = fastdiff.load("arch:tiny-unet", dtype=torch.bfloat16)
    out = pipe.generate(seeds=[3], steps=3, sampler="dpmpp_2m", progress=False)
    ref = tiny_unet.generate(seeds=[3], steps=3, sampler="dpmpp_2m", progress=False)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 0.1


@pytest.mark.parametrize("kwargs,needle", [
    (dict(seeds=[1, 2], n=3), "n=3"),
    (dict(seed=2**63), "seed"),
    (dict(seeds=[-1]), "seed"),
    (dict(height=0), "height"),
    (dict(steps=1001, sampler="ddim"), "steps"),
    (dict(eta=1.0, sampler="dpmpp_2m"), "unknown option"),
    (dict(seed=5, seeds=[1]), "found both"),  # seed was silently ignored
    (dict(n=3, latents=torch.zeros(2, 3, 16, 16)), "n=3 but latents hold 2"),  # silently returned 2
    (dict(latents=[[0.0]]), "found list"),  # was an AttributeError
    (dict(latents=torch.zeros(3, 16, 16)), "(B, C, H, W)"),
    (dict(cfg_scale=float("nan")), "cfg_scale: expected a finite number"),  # every sample became NaN, no error
    (dict(cfg_scale=float("inf")), "cfg_scale: expected a finite number"),
    (dict(cfg_scale="3"), "cfg_scale: expected a finite number"),
    (dict(guidance_rescale=float("nan")), "guidance_rescale"),
    (dict(eta=float("nan"), sampler="ddim"), "are NaN"),  # compared False everywhere: silently eta = 0
    (dict(s_churn=float("nan"), sampler="euler"), "are NaN"),
])
def test_more_bad_arguments(tiny_unet, kwargs, needle):
    with pytest.raises(BadArgumentError) as e:
        tiny_unet.generate(**{"steps": 2, "progress": False, **kwargs})
    assert needle in str(e.value)


def test_numpy_latents_are_taken_like_a_tensor(tiny_unet):
    """NumPy latents fix the batch and the size as a tensor does (8x8 here, not the model's 16x16)."""
    z = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    kw = dict(steps=2, sampler="euler", progress=False)
    out = tiny_unet.generate(latents=z, **kw)
    assert out.shape == (2, 3, 8, 8) and torch.equal(out, tiny_unet.generate(latents=torch.from_numpy(z), **kw))
    assert torch.equal(tiny_unet.generate(latents=z, n=2, **kw), out)  # n may repeat the latents' batch


def test_text_states_errors_say_what_they_found():
    pipe = fastdiff.load("arch:tiny-sd-unet")
    ctx = torch.randn(1, 5, 32)
    kw = dict(steps=1, sampler="euler", progress=False)
    # CFG stacks positive and negative states in one batch: other token counts were torch's "Sizes of tensors"
    with pytest.raises(BadArgumentError, match=r"token count of encoder_hidden_states \(5\), found 7"):
        pipe.generate(encoder_hidden_states=ctx, negative_encoder_hidden_states=torch.randn(1, 7, 32), cfg_scale=3.0,
                      **kw)
    with pytest.raises(BadArgumentError, match="encoder_hidden_states: expected a floating-point tensor.*int64"):
        pipe.generate(encoder_hidden_states=ctx.long(), **kw)
    with pytest.raises(BadArgumentError, match="negative_encoder_hidden_states: expected a floating-point"):
        pipe.generate(encoder_hidden_states=ctx, negative_encoder_hidden_states=ctx.long(), cfg_scale=3.0, **kw)
    # NaN text made an all-NaN sample, no error (review)
    nan = ctx.clone()
    nan[0, 2, 3] = float("nan")
    with pytest.raises(BadArgumentError, match="negative_encoder_hidden_states: expected finite values"):
        pipe.generate(encoder_hidden_states=ctx, negative_encoder_hidden_states=nan, cfg_scale=3.0, **kw)
    with pytest.raises(BadArgumentError, match="encoder_hidden_states: expected finite values"):
        pipe.generate(encoder_hidden_states=nan * float("inf"), **kw)


def test_negative_states_are_the_unconditional_pass():
    """cfg_scale=w guides against negative_encoder_hidden_states: with one Euler step the sample is the denoised
    x0 at the first sigma, linear in the network's outputs, so it must equal uncond + w * (cond - uncond) built
    from two unguided runs, one on the positive states and one on the negative ones. An unconditional pass on the
    positive states, on zeros or on anything else fails this (those differ by ~1e-2 relative here)."""
    pipe = fastdiff.load("arch:tiny-sd-unet")
    g = torch.Generator().manual_seed(0)
    ctx, neg = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    kw = dict(seeds=[1, 2], steps=1, sampler="euler", progress=False)
    cond = pipe.generate(encoder_hidden_states=ctx, **kw)
    uncond = pipe.generate(encoder_hidden_states=neg, **kw)
    guided = pipe.generate(encoder_hidden_states=ctx, negative_encoder_hidden_states=neg, cfg_scale=4.0, **kw)
    assert rel_err(guided, uncond + 4.0 * (cond - uncond)) <= 1e-5
    assert rel_err(guided, cond) > 1e-3  # the guidance is large enough to see
    # over a whole run: negative == positive states is no guidance at all
    kw["steps"] = 3
    same = pipe.generate(encoder_hidden_states=ctx, negative_encoder_hidden_states=ctx, cfg_scale=4.0, **kw)
    assert rel_err(same, pipe.generate(encoder_hidden_states=ctx, **kw)) <= 1e-5
    other = pipe.generate(encoder_hidden_states=ctx, negative_encoder_hidden_states=ctx * 0, cfg_scale=4.0, **kw)
    assert rel_err(other, same) > 1e-3


def test_progress_bar_counts_steps_and_is_closed_even_when_sampling_raises(monkeypatch):
    """progress=True: one bar of ``steps`` (sampler steps, not network calls: Heun's 3 steps call the network 5
    times), filled and closed; closed too when the run raises half way."""
    import tqdm.auto

    bars = []

    class Bar:  # stands in for tqdm, which disables itself when stderr is not a terminal (as under pytest)
        def __init__(self, total=None, **kw):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    pipe = fastdiff.load("arch:tiny-unet")
    for sampler in ("euler", "heun"):
        pipe.generate(seeds=[1], steps=3, sampler=sampler, progress=True)
        bar = bars[-1]
        assert (bar.total, bar.n, bar.closed) == (3, 3, True)
    pipe.generate(seeds=[1], steps=3, sampler="euler", progress=False)
    assert len(bars) == 2

    network, calls = pipe.runner, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return network(*args, **kw)

    pipe.runner = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe.generate(seeds=[1], steps=3, sampler="euler", progress=True)
    bar = bars[-1]
    assert len(bars) == 3 and bar.n == 1 and bar.closed

    pipe.loop_graphs = object()  # a captured loop takes no per-step callback: refused before any bar is opened
    with pytest.raises(BadArgumentError, match="callback"):
        pipe.generate(seeds=[1], steps=3, sampler="euler", progress=True, callback=lambda info: None)
    assert len(bars) == 3


def test_class_labels_out_of_range_are_refused_on_the_host():
    pipe = fastdiff.load("arch:tiny-dit")  # 10 classes, null label 10
    for bad in ([11], [-1]):
        with pytest.raises(BadArgumentError, match="class_labels"):
            pipe.generate(seeds=[1], class_labels=bad, steps=1, progress=False)
    pipe.generate(seeds=[1], class_labels=[10], steps=1, progress=False)  # the null label is allowed


def test_sampler_options_reach_the_scheduler_config_plan(tiny_unet):
    assert tiny_unet.plan(4).sampler == "ddim"  # arch:tiny-unet ships a DDIMScheduler config
    assert tiny_unet.plan(4, eta=0.5).options["eta"] == 0.5
    a = tiny_unet.generate(seeds=[1], steps=4, progress=False)
    b = tiny_unet.generate(seeds=[1], steps=4, progress=False, eta=0.5)
    assert not torch.equal(a, b)


def test_cached_plans_are_not_shared_with_callers():
    """plan() caches its work, but each call returns a plan whose mutable parts are its own."""
    pipe = fastdiff.load("arch:tiny-unet")
    first = pipe.plan(5, "dpmpp_2m")
    first.sigmas *= 2
    first.denoiser_options["clip_sample"] = 0.01
    first.options["eta"] = 3.0
    again = pipe.plan(5, "dpmpp_2m")
    assert float(again.sigmas[0]) * 2 == pytest.approx(float(first.sigmas[0]))
    assert "clip_sample" not in again.denoiser_options and "eta" not in again.options
    pipe.spec.scheduler["beta_schedule"] = "scaled_linear"  # editing the spec afterwards: a fresh plan
    assert not torch.equal(pipe.plan(5, "dpmpp_2m").sigmas, again.sigmas)


def test_an_edited_scheduler_list_is_a_new_plan():
    """The plan cache keys list entries of the scheduler config by their values, not their length."""
    pipe = fastdiff.load("arch:tiny-unet")
    kw = dict(seeds=[1], steps=4, sampler="ddim", progress=False)
    pipe.spec.scheduler["trained_betas"] = torch.linspace(1e-4, 0.02, 1000).tolist()
    first = pipe.generate(**kw)
    pipe.spec.scheduler["trained_betas"] = torch.linspace(1e-4, 0.04, 1000).tolist()  # same length
    assert not torch.equal(pipe.generate(**kw), first)


def test_save_never_replaces_a_folder_it_did_not_write(tmp_path):
    """save() swaps whole folders atomically: it replaces an earlier save, never a folder with other files."""
    pipe = fastdiff.load("arch:tiny-unet")
    pipe.save(str(tmp_path / "m"))
    pipe.save(str(tmp_path / "m"))  # an earlier save is replaced
    assert sorted(os.listdir(tmp_path / "m")) == ["fastdiff.json", "model.safetensors"]
    mine = tmp_path / "outputs"
    mine.mkdir()
    (mine / "notes.txt").write_text("irreplaceable")
    (tmp_path / "m" / "extra.png").write_bytes(b"png")
    for target, found in ((mine, "notes.txt"), (tmp_path / "m", "extra.png")):
        with pytest.raises(BadArgumentError, match=f"not a fastdiff folder \\(found {found}\\)"):
            pipe.save(str(target))
    assert (mine / "notes.txt").read_text() == "irreplaceable" and (tmp_path / "m" / "extra.png").exists()


def test_a_unet_with_a_continuous_class_input_says_generate_cannot_feed_it(tmp_path):
    """diffusers' class_embed_type="timestep" (a continuous class input): generate() used to refuse labels as "not
    class-conditional" and then fail without them ("expected class_labels"); now one error says why."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.errors import UnsupportedConfigError

    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8, class_embed_type="timestep",
    ).save_pretrained(tmp_path)
    pipe = fastdiff.load(str(tmp_path))
    ctx = torch.randn(1, 5, 16)
    for labels in (None, [3, 7]):
        with pytest.raises(UnsupportedConfigError, match="class_embed_type.*'timestep'.*continuous class input"):
            pipe.generate(seeds=[1, 2], steps=2, encoder_hidden_states=ctx, class_labels=labels, progress=False)
    out = pipe.model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 20.0]), encoder_hidden_states=ctx.expand(2, -1, -1),
                     class_labels=torch.tensor([0.5, 0.25]))  # the network itself takes the input
    assert out.shape == (2, 4, 8, 8)


def test_an_image_conditioned_unet_says_generate_cannot_feed_its_conditioning_channels(tmp_path):
    """A depth-conditioned UNet (5 input channels: 4 latents + depth; 4 out): generate() says what it cannot supply
    rather than failing inside the first step. (An inpainting UNet, 9 = 4 + 1 + 4, is ModelSpec.inpainting:
    tests/test_inpaint.py.)"""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.errors import UnsupportedConfigError

    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=5, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    ).save_pretrained(tmp_path)
    pipe = fastdiff.load(str(tmp_path))
    assert not pipe.spec.inpainting
    with pytest.raises(UnsupportedConfigError, match="1 conditioning channels beside its 4 latent ones"):
        pipe.generate(seeds=[1], steps=2, encoder_hidden_states=torch.randn(1, 5, 16), progress=False)


@pytest.mark.parametrize("labels", [[1.5], ["3"], [True], torch.tensor([2.5]), [float("inf")]])
def test_class_labels_must_be_integers(labels):
    """1.5 and True were truncated to a label silently, "3" raised a raw ValueError; whole-number floats still pass."""
    pipe = fastdiff.load("arch:tiny-dit")
    with pytest.raises(BadArgumentError, match="class_labels: expected integer labels"):
        pipe.generate(seeds=[1], steps=2, class_labels=labels, progress=False)
    kw = dict(seeds=[1], steps=2, progress=False)
    assert torch.equal(pipe.generate(class_labels=torch.tensor([2.0]), **kw), pipe.generate(class_labels=[2], **kw))


@pytest.mark.parametrize("bad", [[2.0, 3.0], [float("nan")], "3", [[1.0, 2.0, 3.0]], True, [True, False, True],
                                 [2.0, True, 3.0]])
def test_per_sample_cfg_scales_are_checked(bad):
    pipe = fastdiff.load("arch:tiny-dit")
    with pytest.raises(BadArgumentError, match="cfg_scale: expected a finite number"):
        pipe.generate(seeds=[1, 2, 3], class_labels=[1, 2, 3], cfg_scale=bad, steps=1, progress=False)


def test_per_sample_cfg_scales_as_a_tensor_and_a_single_entry():
    pipe = fastdiff.load("arch:tiny-dit")
    kw = dict(seeds=[1, 2], class_labels=[1, 2], steps=2, sampler="ddim", progress=False)
    want = pipe.generate(cfg_scale=3.0, **kw)
    assert torch.equal(pipe.generate(cfg_scale=torch.tensor([3.0, 3.0]), **kw), want)
    assert torch.equal(pipe.generate(cfg_scale=[3.0], **kw), want)
    mixed = pipe.generate(cfg_scale=torch.tensor([3.0, 6.0]), **kw)
    assert torch.equal(mixed[:1], want[:1]) and not torch.allclose(mixed[1:], want[1:])
