"""guided-diffusion's noisy-image classifiers (``EncoderUNetModel``) and classifier guidance, against a transcription of
the official code (``adm_reference``: the classifier; ``test_guided_diffusion_sampling``: ``p_sample`` with
``condition_mean`` and ``ddim_sample`` with ``condition_score``)."""

import math

import pytest
import torch

import fastdiff
from adm_reference import EncoderUNetModel, randomized
from fastdiff.checkpoints.guided_classifier import build_classifier, classifier_config, is_guided_classifier_state_dict
from fastdiff.classifier_guidance import ClassifierGuidance, ClassifierGuidedDenoiser
from fastdiff.errors import BadArgumentError, CheckpointError, FastdiffError
from fastdiff.noise import NoiseSource
from fastdiff.scheduler_config import plan_from_scheduler_config
from test_guided_diffusion_sampling import (_Bounded, _guided_diffusion_ddim_loop, _guided_diffusion_p_sample_loop,
                                            _official_ddim_stride_timesteps)
from test_sampler_order import single_thread  # noqa: F401  (autouse fixture)

TINY = dict(image_size=16, in_channels=3, model_channels=64, out_channels=10, num_res_blocks=2,
            attention_resolutions=(2, 4), channel_mult=(1, 1, 2), num_head_channels=16)


def official(seed=1, **kw):
    return randomized(EncoderUNetModel(**dict(TINY, **kw)), seed)


def _grad(model, x, t, y):
    """guided-diffusion's cond_fn without the scale: grad_x log softmax(model(x, t))[y]."""
    x = x.detach().requires_grad_(True)
    logp = torch.log_softmax(model(x, t), dim=-1)
    return torch.autograd.grad(logp[torch.arange(len(y)), y].sum(), x)[0]


@pytest.mark.parametrize("kw", [
    dict(pool="attention"),
    dict(pool="adaptive"),
    dict(pool="spatial"),
    dict(pool="spatial_v2"),
    dict(pool="attention", use_new_attention_order=True, use_scale_shift_norm=False),
    dict(pool="attention", channel_mult=(0.5, 1, 2)),  # OpenAI's 512 px layout (a first level at half width)
    dict(pool="attention", image_size=24, num_res_blocks=1, channel_mult=(1, 2)),  # odd map: 12x12 tokens
    dict(pool="adaptive", resblock_updown=False),  # strided-conv downsampling
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_classifier_matches_official(kw):
    ref = official(**kw)
    order = "new" if kw.get("use_new_attention_order") else "legacy"
    ours = build_classifier(ref.state_dict(), head_channels=16, attention_order=order)
    size = kw.get("image_size", 16)
    assert (ours.config.pool, ours.config.num_classes) == (kw["pool"], 10)
    if kw["pool"] == "attention":
        assert ours.config.image_size == size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 417, 999])
    with torch.no_grad():
        a, b = ref(x, t), ours(x, t)
    assert float(a.abs().max()) > 0.05  # not a trivial output
    torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-5)
    y = torch.tensor([1, 7, 3])
    g_ref, g = _grad(ref, x, t, y), _grad(ours, x, t, y)
    # (2e-6 of the largest gradient: float32 reduction order; on some CPUs 1e-6 missed by 1.1x at one element of 2304)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=2e-6 * float(g_ref.abs().max()) + 1e-7)


def test_classifier_keys_and_refusals(tmp_path):
    state = official().state_dict()
    assert is_guided_classifier_state_dict(state)
    cfg = classifier_config(state, head_channels=16)
    assert (cfg.encoder.layers_per_block, len(cfg.encoder.block_out_channels)) == (2, 3)
    with pytest.raises(CheckpointError, match="split"):  # a wrong depth: no split
        classifier_config(state, head_channels=16, layers_per_block=1)
    with pytest.raises(FastdiffError, match="unused|no native counterpart"):
        build_classifier(dict(state, extra=torch.zeros(1)), head_channels=16)
    damaged = {k: v for k, v in state.items() if not k.startswith("out.2.c_proj")}
    with pytest.raises(FastdiffError, match="out.2.c_proj"):
        build_classifier(damaged, head_channels=16)
    # fastdiff.load names what the file is and where it goes
    path = str(tmp_path / "classifier.pt")
    torch.save(state, path)
    with pytest.raises(FastdiffError, match="load_classifier"):
        fastdiff.load(path)
    spatial = str(tmp_path / "spatial.pt")  # (its head's out.2.weight is also an ADM UNet's key)
    torch.save(official(pool="spatial").state_dict(), spatial)
    with pytest.raises(FastdiffError, match="load_classifier"):
        fastdiff.load(spatial)
    # the attention pooling fixes the image size
    ours = build_classifier(state, head_channels=16)
    with pytest.raises(BadArgumentError, match="expected 16x16 images"):
        ours(torch.randn(1, 3, 32, 32), torch.tensor([5]))


def test_conv_downsampling_marks_the_levels():
    """A strided conv (resblock_updown=False) marks each downsampling block: levels that keep their width still split
    one way."""
    ref = official(seed=4, channel_mult=(1, 1, 1), resblock_updown=False, pool="adaptive")
    cfg = classifier_config(ref.state_dict(), head_channels=16)
    assert (len(cfg.encoder.block_out_channels), cfg.encoder.layers_per_block) == (3, 2)


def test_ambiguous_depth_is_refused_with_the_way_out():
    # one level of 3 blocks, or 2 levels of 1 block (+ the downsampling one): the keys cannot tell them apart
    ref = randomized(EncoderUNetModel(image_size=8, in_channels=3, model_channels=32, out_channels=4, num_res_blocks=1,
                                      attention_resolutions=(), channel_mult=(1, 1), num_head_channels=16,
                                      pool="adaptive"), 3)
    state = ref.state_dict()
    with pytest.raises(CheckpointError, match="layers_per_block"):
        classifier_config(state, head_channels=16)
    ours = build_classifier(state, head_channels=16, layers_per_block=1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 800])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), ref(x, t), rtol=1e-5, atol=2e-5)


# --- sampling --------------------------------------------------------------------------------------------------------

SHAPE = (3, 8, 8)
SEEDS = [4, 5]
LABELS = torch.tensor([2, 9])


def _small_classifier():
    return official(seed=7, image_size=8, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(2,))


def _cond_fn(classifier, scale):
    return lambda x, t: scale * _grad(classifier, x, torch.full((x.shape[0],), t), LABELS)


def _guided(plan, net, classifier, scale):
    base = plan.make_denoiser(net)
    return ClassifierGuidedDenoiser(base, ClassifierGuidance(classifier, LABELS, scale, base))


@pytest.mark.parametrize("steps", [10, 25])
def test_ddpm_is_guided_diffusions_condition_mean(steps):
    """classifier_sample.py's default: p_sample (learned range, x0 clipped) with the mean moved by variance x
    gradient, the last step's too."""
    net, ref_cls = _Bounded(), _small_classifier()
    ours_cls = build_classifier(ref_cls.state_dict(), head_channels=16)
    scale = 3.0

    def split(x, t):
        out = net(x, torch.tensor([float(t)]))
        return out[:, :3], out[:, 3:]

    ref, _ = _guided_diffusion_p_sample_loop(split, steps, SEEDS, SHAPE, clip=True, cond_fn=_cond_fn(ref_cls, scale))
    plain, _ = _guided_diffusion_p_sample_loop(split, steps, SEEDS, SHAPE, clip=True)
    plan = plan_from_scheduler_config({"_class_name": "DDPMScheduler", "variance_type": "learned_range",
                                       "timestep_respacing": "guided-diffusion"}, steps)
    src = NoiseSource(SEEDS)
    got = plan.sample(_guided(plan, net, ours_cls, scale), src.randn(SHAPE), noise=src)
    assert float((ref - plain).abs().max()) > 1e-2  # the guidance moved the sample
    assert float((got - ref.float()).abs().max() / ref.abs().max()) <= 1e-4


class _Constant(ClassifierGuidance):
    """g = ``value`` everywhere: large enough that the last step's shift (variance ~1e-4 x g) shows."""

    value = 50.0

    def gradient(self, x, sigma):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small", "fixed_large"])
def test_ddpm_condition_mean_every_step_and_the_last(variance):
    """Each variance's condition_mean against the transcription, the t = 0 step's variance included (0 for
    fixed_small, posterior_variance[1] for fixed_large and as the learned range's lower end); a sliced plan's last
    step reads the variance of the step before it (``sigma_before``)."""
    net = _Bounded()

    def split(x, t):
        out = net(x, torch.tensor([float(t)]))
        return out[:, :3], out[:, 3:]

    steps = 10
    ref, _ = _guided_diffusion_p_sample_loop(split, steps, SEEDS, SHAPE, clip=True, variance=variance,
                                             cond_fn=lambda x, t: torch.full_like(x, _Constant.value))
    plan = plan_from_scheduler_config({"_class_name": "DDPMScheduler", "variance_type": variance,
                                       "timestep_respacing": "guided-diffusion"}, steps)
    base = plan.make_denoiser(net)
    src = NoiseSource(SEEDS)
    got = plan.sample(ClassifierGuidedDenoiser(base, _Constant(None, LABELS, 1.0, base)), src.randn(SHAPE),
                      noise=src)
    assert float((got - ref.float()).abs().max() / ref.abs().max()) <= 1e-5
    # the last step alone (img2img's slice): its shift is guided-diffusion's t = 0 variance times g
    last = plan.from_step(steps - 1)
    assert last.options["sigma_before"] == float(plan.sigmas[-3])
    x = torch.randn(2, *SHAPE)
    zero = lambda i, like: torch.zeros_like(like)  # noqa: E731
    shift = last.sample(ClassifierGuidedDenoiser(base, _Constant(None, LABELS, 1.0, base)), x, noise=zero) - \
        last.sample(base, x, noise=zero)
    if variance == "fixed_large":  # posterior_variance[1]: the step from t1 to t0's
        s1, s0 = float(plan.sigmas[-3]), float(plan.sigmas[-2])
        beta = (s1 * s1 - s0 * s0) / (1 + s1 * s1)
        want = s0 * s0 / (1 + s0 * s0) / (s1 * s1 / (1 + s1 * s1)) * beta * _Constant.value
        torch.testing.assert_close(shift, torch.full_like(shift, want), rtol=1e-4, atol=1e-7)
        assert want > 1e-3
    elif variance == "fixed_small":
        assert float(shift.abs().max()) == 0.0
    else:  # learned_range: exp(f log beta + (1 - f) log posterior_variance[1]), f = (v + 1) / 2, at t = 0
        s1, s0 = float(plan.sigmas[-3]), float(plan.sigmas[-2])
        beta1 = (s1 * s1 - s0 * s0) / (1 + s1 * s1)
        lo = math.log(s0 * s0 / (1 + s0 * s0) / (s1 * s1 / (1 + s1 * s1)) * beta1)
        hi = math.log(s0 * s0 / (1 + s0 * s0))
        with torch.no_grad():
            _, v = base.predict_variance_at(x, s0)
        want = torch.exp(lo + (v + 1) / 2 * (hi - lo)) * _Constant.value
        torch.testing.assert_close(shift, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_fixed_variances_move_the_mean_by_their_variance(variance):
    """condition_mean with a fixed variance: the shift is var g, so a zero gradient changes nothing and the shift of
    a step is exactly its variance times the gradient (checked on one step by hand)."""
    from fastdiff.ddpm import sample_ddpm

    net = _Bounded()
    plan = plan_from_scheduler_config({"_class_name": "DDPMScheduler", "variance_type": variance,
                                       "timestep_respacing": "guided-diffusion"}, 4)
    base = plan.make_denoiser(net)

    class Constant(ClassifierGuidance):  # g = 1 everywhere
        def gradient(self, x, sigma):
            return torch.ones_like(x)

    sig = plan.sigmas.tolist()
    x = torch.randn(1, *SHAPE)
    one_step = [sig[0], sig[1]]
    guided = ClassifierGuidedDenoiser(base, Constant(None, LABELS[:1], 1.0, base))
    a = sample_ddpm(guided, x, one_step, variance=variance, noise=lambda i, like: torch.zeros_like(like))
    b = sample_ddpm(base, x, one_step, variance=variance, noise=lambda i, like: torch.zeros_like(like))
    s, s1 = sig[0], sig[1]
    beta = (s * s - s1 * s1) / (1 + s * s)
    var = beta if variance == "fixed_large" else s1 * s1 / (1 + s1 * s1) / (s * s / (1 + s * s)) * beta
    torch.testing.assert_close(a - b, torch.full_like(a, var * (1 + s1 * s1) ** 0.5), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("steps", [10, 30])
def test_ddim_is_guided_diffusions_condition_score(steps):
    """classifier_sample.py --use_ddim: eps' = eps - sqrt(1 - a) g after x0 is clipped, x0 from eps' unclipped."""
    net, ref_cls = _Bounded(), _small_classifier()
    ours_cls = build_classifier(ref_cls.state_dict(), head_channels=16)
    scale = 5.0
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    eps_only = lambda x, t: net(x, torch.tensor([float(t)]))[:, :3]  # noqa: E731
    ts = _official_ddim_stride_timesteps(1000, steps)
    ref = _guided_diffusion_ddim_loop(eps_only, ts, x, True, cond_fn=_cond_fn(ref_cls, scale))
    plain = _guided_diffusion_ddim_loop(eps_only, ts, x, True)
    plan = plan_from_scheduler_config({"_class_name": "DDIMScheduler", "timestep_respacing": "guided-diffusion-ddim"},
                                      steps)
    got = plan.sample(_guided(plan, lambda x, t, **kw: net(x, t), ours_cls, scale), x)
    assert float((ref - plain).abs().max()) > 1e-2
    assert float((got - ref.float()).abs().max() / ref.abs().max()) <= 1e-4


def test_score_form_for_any_sampler_and_per_sample_sigmas():
    """The x0 correction sigma^2 c_in g is the same at a host sigma and for per-sample sigma tensors; a scale of 0 is
    the unguided denoiser."""
    net, cls = _Bounded(), build_classifier(_small_classifier().state_dict(), head_channels=16)
    plan = plan_from_scheduler_config({"_class_name": "EulerDiscreteScheduler"}, 10)
    base = plan.make_denoiser(lambda x, t, **kw: net(x, t))
    guided = ClassifierGuidedDenoiser(base, ClassifierGuidance(cls, LABELS, 2.0, base))
    x = torch.randn(2, *SHAPE)
    s = float(plan.sigmas[3])
    with torch.no_grad():  # (as the samplers call it)
        at = guided.denoise_at(x, s)
        per_sample = guided(x, torch.tensor([s, s]))
        torch.testing.assert_close(per_sample, at, rtol=1e-4, atol=1e-5)
        assert float((at - base.denoise_at(x, s)).abs().max()) > 1e-3
        zero = ClassifierGuidedDenoiser(base, ClassifierGuidance(cls, LABELS, 0.0, base))
        torch.testing.assert_close(zero.denoise_at(x, s), base.denoise_at(x, s))
        out = plan.sample(guided, x * float(plan.sigmas[0]))
    assert torch.isfinite(out).all()


def test_guidance_needs_a_discrete_time_model():
    from fastdiff.denoiser import EDMDenoiser

    with pytest.raises(BadArgumentError, match="discrete-time"):
        ClassifierGuidance(lambda x, t: x.mean((1, 2, 3))[:, None], LABELS, 1.0, EDMDenoiser(_Bounded()))


# --- the pipeline ----------------------------------------------------------------------------------------------------

@pytest.fixture
def classifier_file(tmp_path):
    path = tmp_path / "16x16_classifier.pt"
    torch.save(official(seed=11).state_dict(), path)
    return str(path)


def test_pipeline_guides_an_unconditional_model(classifier_file):
    """An unconditional ADM-style UNet with a classifier (256x256_diffusion_uncond.pt + 256x256_classifier.pt): the
    labels go to the classifier alone; generate equals the guided denoiser run by hand; scale 0 is the plain run."""
    pipe = fastdiff.load("arch:tiny-unet")
    kw = dict(seeds=[1, 2], steps=6, progress=False)
    plain = pipe.generate(**kw)
    with pytest.raises(BadArgumentError, match="classifier_scale"):
        pipe.generate(classifier_scale=2.0, **kw)
    pipe.load_classifier(classifier_file, head_channels=16, scale=4.0)
    with pytest.raises(BadArgumentError, match="class_labels"):
        pipe.generate(**kw)
    with pytest.raises(BadArgumentError, match=r"\[0, 9\]"):
        pipe.generate(class_labels=[3, 10], **kw)
    got = pipe.generate(class_labels=[3, 8], **kw)
    assert float((got - plain).abs().max()) > 1e-3
    plan = pipe.plan(6)
    base = plan.make_denoiser(pipe.runner)
    guided = ClassifierGuidedDenoiser(base, ClassifierGuidance(pipe.classifier, torch.tensor([3, 8]), 4.0, base))
    src = NoiseSource([1, 2])
    by_hand = plan.sample(guided, src.randn((3, 16, 16)), noise=src)
    torch.testing.assert_close(got, by_hand)
    torch.testing.assert_close(pipe.generate(class_labels=[3, 8], classifier_scale=0.0, **kw), plain)
    stronger = pipe.generate(class_labels=[3, 8], classifier_scale=8.0, **kw)
    assert float((stronger - got).abs().max()) > 1e-3
    # a sample depends on its own seed and label only
    solo = pipe.generate(class_labels=[8], seeds=[2], steps=6, progress=False)
    torch.testing.assert_close(solo[0], got[1], rtol=1e-4, atol=1e-4)  # (batched convolutions round differently)
    pipe.unload_classifier()
    torch.testing.assert_close(pipe.generate(**kw), plain)


def test_pipeline_classifier_refusals(classifier_file):
    with pytest.raises(BadArgumentError, match="flux"):
        fastdiff.load("arch:tiny-flux").load_classifier(classifier_file, head_channels=16)
    with pytest.raises(BadArgumentError, match="4 channels|3-channel"):
        fastdiff.load("arch:tiny-sd-unet").load_classifier(classifier_file, head_channels=16)
    with pytest.raises(CheckpointError, match="expected a guided-diffusion classifier"):
        fastdiff.load("arch:tiny-unet").load_classifier({"input_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(BadArgumentError, match="no file"):
        fastdiff.load("arch:tiny-unet").load_classifier("/nonexistent/classifier.pt")
    with pytest.raises(BadArgumentError, match="classifier_scale"):
        fastdiff.load("arch:tiny-unet").load_classifier(classifier_file, head_channels=16, scale=float("nan"))
    for kw, name in ((dict(head_channels=0), "head_channels"), (dict(num_heads=0), "num_heads"),
                     (dict(dtype=torch.int64), "dtype"), (dict(layers_per_block=0), "layers_per_block")):
        with pytest.raises(BadArgumentError, match=name):
            fastdiff.load("arch:tiny-unet").load_classifier(classifier_file, **kw)
    pipe = fastdiff.load("arch:tiny-unet").load_classifier(classifier_file, head_channels=16, dtype="bf16")
    assert pipe.classifier.encoder.conv_in.weight.dtype == torch.bfloat16


def test_classifier_labels_and_modes(classifier_file):
    """Labels are read as for a class model (whole-number floats; anything else one clear line), checked against the
    classifier's classes (a module without a config: against its logits); a run under torch.inference_mode is the
    run outside it; a continuous-time model is refused when the classifier is set."""
    pipe = fastdiff.load("arch:tiny-unet").load_classifier(classifier_file, head_channels=16)
    kw = dict(seeds=[1, 2], steps=3, progress=False)
    want = pipe.generate(class_labels=[3, 8], **kw)
    torch.testing.assert_close(pipe.generate(class_labels=torch.tensor([3.0, 8.0]), **kw), want)
    with torch.inference_mode():
        torch.testing.assert_close(pipe.generate(class_labels=[3, 8], **kw), want)
    for bad, match in (("cat", "integer labels"), ([1, None], "integer labels"), ([1.5, 2], "integer labels"),
                       ([-1, 2], r"\[0, 9\].*found -1")):
        with pytest.raises(BadArgumentError, match=match):
            pipe.generate(class_labels=bad, **kw)
    with pytest.raises(BadArgumentError, match="unconditional, and its class_labels steer the classifier alone"):
        pipe.generate(class_labels=[3, 8], cfg_scale=2.0, **kw)

    class Bare(torch.nn.Module):  # a classifier without a config: 10 classes known from its logits only
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(10, 3))

        def forward(self, x, t):
            return x.mean((2, 3)) @ self.w.T

    pipe.set_classifier(Bare(), scale=2.0)
    assert torch.isfinite(pipe.generate(class_labels=[9, 0], **kw)).all()
    for bad, found in (([12, 0], "found 12"), ([-1, 0], "found -1")):
        with pytest.raises(BadArgumentError, match=found):
            pipe.generate(class_labels=bad, **kw)
    with pytest.raises(BadArgumentError, match="continuous time"):
        fastdiff.load("builtin:digits_flow").set_classifier(Bare())


def test_per_sample_scales_and_scale_zero(classifier_file):
    """classifier_scale per sample (as cfg_scale): each sample equals its run at its own scale; 0 everywhere is the
    unguided run with no classifier pass."""
    pipe = fastdiff.load("arch:tiny-unet").load_classifier(classifier_file, head_channels=16, scale=3.0)
    kw = dict(seeds=[1, 2], class_labels=[3, 8], steps=3, progress=False)
    mixed = pipe.generate(classifier_scale=[0.0, 6.0], **kw)
    plain = fastdiff.load("arch:tiny-unet").generate(seeds=[1, 2], steps=3, progress=False)
    torch.testing.assert_close(mixed[0], plain[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], pipe.generate(classifier_scale=6.0, **kw)[1], rtol=1e-4, atol=1e-4)
    calls = []
    pipe.classifier.register_forward_hook(lambda module, args, out: calls.append(1))
    torch.testing.assert_close(pipe.generate(classifier_scale=[0, 0], **kw), plain)
    assert not calls
    with pytest.raises(BadArgumentError, match="classifier_scale"):
        pipe.generate(classifier_scale=[1.0, 2.0, 3.0], **kw)


def test_engine_batches_classifier_guided_requests(classifier_file):
    """Requests of different classifier scales (and the pipeline's default) share a batch, each equal to its solo
    run; a scale without a classifier fails its own request."""
    pipe = fastdiff.load("arch:tiny-unet").load_classifier(classifier_file, head_channels=16, scale=3.0)
    asks = ((1, 3, 2.0), (2, 5, None), (3, 7, 8.0))
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=500) as engine:
        futures = [engine.submit(seed=s, class_label=c, steps=4, classifier_scale=k) for s, c, k in asks]
        got = [f.result(timeout=60) for f in futures]
        assert max(engine.stats()["batch_size_hist"]) > 1  # (scales do not split a batch)
    for (s, c, k), out in zip(asks, got):
        solo = pipe.generate(seeds=[s], class_labels=[c], steps=4, classifier_scale=k, progress=False)[0]
        torch.testing.assert_close(out, solo, rtol=1e-4, atol=1e-4)
    with fastdiff.Engine(fastdiff.load("arch:tiny-unet")) as engine:
        with pytest.raises(BadArgumentError, match="no classifier is loaded"):
            engine.submit(seed=1, classifier_scale=2.0, steps=2).result(timeout=60)


@pytest.mark.parametrize("sampler", [None, "ddpm"])
def test_official_guided_diffusion_checkpoint_with_a_classifier(sampler):
    """The fixture's class-conditional ADM network (official weights layout) with an official-layout 1000-class
    classifier: the default run is classifier_sample.py --use_ddim (condition_score), sampler="ddpm" its p_sample
    (condition_mean), both with x0 clipped and the network fed the labels too."""
    from conftest import fixture_path

    pipe = fastdiff.load(fixture_path("guided_diffusion", "model.pt"), head_channels=16)
    ref_cls = official(seed=13, out_channels=1000)
    pipe.load_classifier(ref_cls.state_dict(), head_channels=16, scale=10.0)
    labels, seeds, steps = [417, 3], [21, 22], 10
    y = torch.tensor(labels)
    net = pipe.model
    cond_fn = lambda x, t: 10.0 * _grad(ref_cls, x, torch.full((x.shape[0],), t), y)  # noqa: E731
    with pytest.raises(BadArgumentError, match="expected 16x16 images"):  # (the spec's default: 64 px, from 2 levels)
        pipe.generate(seeds=seeds, class_labels=labels, steps=2, progress=False)
    kw = dict(seeds=seeds, class_labels=labels, steps=steps, sampler=sampler, height=16, width=16, progress=False)
    got = pipe.generate(**kw)
    if sampler is None:
        eps = lambda x, t: net(x, torch.full((x.shape[0],), t), class_labels=y)[:, :3]  # noqa: E731
        x = NoiseSource(seeds).randn((3, 16, 16))
        ref = _guided_diffusion_ddim_loop(eps, _official_ddim_stride_timesteps(1000, steps), x, True, cond_fn=cond_fn)
    else:
        def split(x, t):
            out = net(x, torch.full((x.shape[0],), t), class_labels=y)
            return out[:, :3], out[:, 3:]
        ref, _ = _guided_diffusion_p_sample_loop(split, steps, seeds, (3, 16, 16), clip=True, cond_fn=cond_fn)
    plain = pipe.generate(classifier_scale=0.0, **kw)
    assert float((ref.float() - plain).abs().max()) > 1e-2
    assert float((got - ref.float()).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_cli_generate_with_a_classifier(tmp_path):
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli

    path = str(tmp_path / "cls.pt")
    torch.save(official(seed=11, num_head_channels=64).state_dict(), path)  # (the CLI's heads: create_classifier's 64)
    r = run_cli("generate", "arch:tiny-unet", "--class", "3", "8", "--classifier", path, "--classifier-scale", "4",
                "--steps", "3", "--output-latents", "out.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pipe = fastdiff.load("arch:tiny-unet").load_classifier(path, scale=4.0)
    want = pipe.generate(class_labels=[3, 8], seed=0, n=2, steps=3, progress=False)
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["latents"], want, rtol=1e-4, atol=1e-4)
    r = run_cli("generate", "arch:tiny-unet", "--classifier-scale", "4", "--steps", "1", "--output-latents",
                "x.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "--classifier-scale: given, but no --classifier FILE" in r.stderr
