"""``fastdiff bench --compare diffusers[,compile]``: the same weights rebuilt as a diffusers model, timed in a
diffusers-pipeline style loop with the matching diffusers scheduler (and under ``torch.compile``)."""

from __future__ import annotations

import traceback

from .bench_inputs import _conditioning, bench_controlnet, image_pixels
from .bench_report import _one_line, _row_line, _row_stats
from .generate import load_options


def _import_diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                               EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                               KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler,
                               LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)
    except Exception as e:
        raise ImportError(f"diffusers cannot be imported ({type(e).__name__}: {_one_line(e)})") from e
    return {
        "dpmpp_2m": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
        "dpmpp_2m_sde": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")),
        "euler": (EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
        "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
        "heun": (HeunDiscreteScheduler, dict(use_karras_sigmas=True)),
        "ddim": (DDIMScheduler, {}),
        "unipc": (UniPCMultistepScheduler, dict(use_karras_sigmas=True)),
        "plms": (PNDMScheduler, dict(skip_prk_steps=True)),
        "lms": (LMSDiscreteScheduler, dict(use_karras_sigmas=True)),
        "lcm": (LCMScheduler, {}),
        "dpm_2": (KDPM2DiscreteScheduler, dict(use_karras_sigmas=True)),
        "dpm_2_ancestral": (KDPM2AncestralDiscreteScheduler, dict(use_karras_sigmas=True)),
        "deis": (DEISMultistepScheduler, dict(use_karras_sigmas=True)),
    }


# fastdiff-only UNetConfig fields: never passed to diffusers
_UNET_FASTDIFF_ONLY = ("conditional", "extra")


def diffusers_unet(spec):
    """A diffusers UNet2DModel / UNet2DConditionModel with the config of ``spec`` (random weights)."""
    import inspect

    import diffusers

    cfg = dict(spec.model_config)
    conditional = bool(cfg.get("conditional"))
    extra = dict(cfg.get("extra") or {})
    for k in _UNET_FASTDIFF_ONLY:
        cfg.pop(k, None)
    cls = diffusers.UNet2DConditionModel if conditional else diffusers.UNet2DModel
    if conditional and cfg.get("num_attention_heads") is not None:
        # diffusers' historic naming: UNet2DConditionModel's attention_head_dim holds the head counts
        cfg["attention_head_dim"] = cfg["num_attention_heads"]
    cfg.pop("num_attention_heads", None)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in {**extra, **cfg}.items() if k in params}
    # fields the diffusers class lacks are fine at the value that class hard-wires (e.g. conv resampling)
    dropped = sorted(k for k, v in cfg.items()
                     if k not in params and v not in (None, False, 0, 1, 3, "default", "conv"))
    if dropped:
        raise ValueError(f"{cls.__name__} has no field(s) {dropped} set in the native config")
    return cls(**kwargs)


def native_dit_to_diffusers(sd: dict, depth: int, per_block: bool) -> dict:
    """Native (official-layout) DiT state dict -> diffusers DiTTransformer2DModel keys (inverse of
    ``fastdiff.checkpoints.dit.convert_diffusers_dit``): qkv split into to_q / to_k / to_v, the shared
    timestep / class embedders copied into every block (diffusers keeps one per block)."""
    import torch

    out = {}
    out["pos_embed.proj.weight"] = sd["x_embedder.proj.weight"]
    out["pos_embed.proj.bias"] = sd["x_embedder.proj.bias"]
    emb = {"t_embedder.mlp.0": "timestep_embedder.linear_1", "t_embedder.mlp.2": "timestep_embedder.linear_2",
           "y_embedder.embedding_table": "class_embedder.embedding_table"}
    for i in range(depth):
        n, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for nk, dk in emb.items():
            for suffix in (".weight", ".bias"):
                src = (n + nk + suffix) if (per_block and i > 0) else (nk + suffix)
                if src in sd:
                    out[f"{d}norm1.emb.{dk}{suffix}"] = sd[src]
        out[d + "norm1.linear.weight"] = sd[n + "adaLN_modulation.1.weight"]
        out[d + "norm1.linear.bias"] = sd[n + "adaLN_modulation.1.bias"]
        for suffix in (".weight", ".bias"):
            if n + "attn.qkv" + suffix in sd:
                q, k, v = torch.chunk(sd[n + "attn.qkv" + suffix], 3, dim=0)
                out[d + "attn1.to_q" + suffix], out[d + "attn1.to_k" + suffix], out[d + "attn1.to_v" + suffix] = q, k, v
        out[d + "attn1.to_out.0.weight"] = sd[n + "attn.proj.weight"]
        out[d + "attn1.to_out.0.bias"] = sd[n + "attn.proj.bias"]
        out[d + "ff.net.0.proj.weight"] = sd[n + "mlp.fc1.weight"]
        out[d + "ff.net.0.proj.bias"] = sd[n + "mlp.fc1.bias"]
        out[d + "ff.net.2.weight"] = sd[n + "mlp.fc2.weight"]
        out[d + "ff.net.2.bias"] = sd[n + "mlp.fc2.bias"]
    out["proj_out_1.weight"] = sd["final_layer.adaLN_modulation.1.weight"]
    out["proj_out_1.bias"] = sd["final_layer.adaLN_modulation.1.bias"]
    out["proj_out_2.weight"] = sd["final_layer.linear.weight"]
    out["proj_out_2.bias"] = sd["final_layer.linear.bias"]
    return out


def diffusers_dit(spec):
    """A diffusers DiTTransformer2DModel matching ``spec`` (random weights), and a note on numerics."""
    import diffusers

    c = spec.model_config
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=c["num_heads"], attention_head_dim=c["hidden_size"] // c["num_heads"],
        in_channels=c["in_channels"], out_channels=c["in_channels"] * (2 if c["learn_sigma"] else 1),
        num_layers=c["depth"], sample_size=c["input_size"], patch_size=c["patch_size"],
        num_embeds_ada_norm=c["num_classes"], attention_bias=c["qkv_bias"],
        activation_fn="gelu-approximate" if c["mlp_act"] == "gelu_tanh" else "gelu", norm_eps=c["mlp_norm_eps"])
    note = None
    if float(c.get("freq_shift", 0.0)) != 1.0:
        note = (f"diffusers' DiT embeds timesteps with frequency shift 1, this model with {c.get('freq_shift')}: "
                f"same weights and FLOPs, outputs differ slightly (latency comparison only)")
    return model, note


def diffusers_mmdit(spec):
    """A diffusers SD3Transformer2DModel with the config of ``spec`` (random weights; fastdiff keeps its names)."""
    import diffusers

    cfg = {k: v for k, v in spec.model_config.items() if k != "extra"}
    cfg["dual_attention_layers"] = tuple(cfg["dual_attention_layers"])
    return diffusers.SD3Transformer2DModel(**cfg)


def diffusers_flux(spec):
    """A diffusers FluxTransformer2DModel with the config of ``spec`` (random weights; fastdiff keeps its names)."""
    import diffusers

    cfg = {k: v for k, v in spec.model_config.items() if k != "extra"}
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return diffusers.FluxTransformer2DModel(**cfg)


def build_diffusers_model(pipe):
    """(diffusers model holding pipe's weights, note or None)."""
    spec = pipe.spec
    sd = {k: v.detach().float().cpu() for k, v in pipe.model.state_dict().items()}
    if spec.kind == "unet":
        model, note = diffusers_unet(spec), None
    elif spec.kind == "mmdit":
        model, note = diffusers_mmdit(spec), None
    elif spec.kind == "flux":
        model, note = diffusers_flux(spec), None
    elif spec.kind == "dit":
        model, note = diffusers_dit(spec)
        sd = native_dit_to_diffusers(sd, spec.model_config["depth"], bool(spec.model_config["per_block_conditioning"]))
    else:
        raise ValueError(f"no diffusers counterpart for model kind {spec.kind!r}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not map onto the diffusers model: {len(missing)} missing "
                         f"({', '.join(list(missing)[:3])}), {len(unexpected)} unexpected ({', '.join(list(unexpected)[:3])})")
    return model.eval(), note


def _diffusers_sampler(args, spec, schedulers):
    if spec.prediction_type == "flow_prediction":
        return _diffusers_flow_sampler(args, spec)
    cls, kw = schedulers.get(args.sampler, (None, None))
    note = None
    if cls is None:
        cls, kw = schedulers["dpmpp_2m"]
        note = f"no matching diffusers scheduler for {args.sampler!r}: diffusers runs DPMSolverMultistepScheduler"
    kw, grid_note = _diffusers_grid(args.schedule, kw, spec)
    # (the loop drops a learned variance's channels: a scheduler told to read them would find none)
    sched_cfg = _diffusers_keys(spec, "variance_type")
    from ..scheduler_config import FASTDIFF_KEYS

    own = [k for k in FASTDIFF_KEYS if spec.scheduler.get(k) is not None]
    own_note = (f"diffusers' scheduler has no {', '.join(own)} (fastdiff's keys): its loop runs without them, the same "
                f"network work per step") if own else None
    return cls.from_config(sched_cfg, **kw), "; ".join(n for n in (note, grid_note, own_note) if n) or None


def _diffusers_keys(spec, *dropped: str) -> dict:
    """The spec's scheduler config as a diffusers scheduler reads it: no private keys, none of fastdiff's own, and
    none starting with ``dropped``."""
    from ..scheduler_config import FASTDIFF_KEYS

    return {k: v for k, v in spec.scheduler.items()
            if not k.startswith(("_",) + dropped) and k not in FASTDIFF_KEYS}


def _diffusers_grid(schedule, kw: dict, spec) -> tuple:
    """The diffusers scheduler options for fastdiff's ``--schedule`` (the same sigma grid on both sides), and a note
    where diffusers' scheduler has no such grid. ``kw``: the sampler's own options; ``use_karras_sigmas`` in them marks
    a scheduler that takes a sigma grid."""
    takes_sigmas = "use_karras_sigmas" in kw
    kw = {k: v for k, v in kw.items() if k != "use_karras_sigmas"}
    if schedule is None and spec.prediction_type == "edm":
        schedule = "karras"  # fastdiff's default for EDM models
    if schedule in ("karras", "exponential"):
        if takes_sigmas:
            return dict(kw, **{f"use_{schedule}_sigmas": True}), None
        return kw, f"diffusers' scheduler for this sampler has no {schedule} grid: it runs its config's spacing"
    if schedule in ("leading", "trailing", "linspace"):
        return dict(kw, timestep_spacing=schedule), None
    if schedule is not None:
        return kw, f"diffusers has no {schedule!r} grid: it runs its config's spacing"
    return kw, None  # the checkpoint's own spacing on both sides


def _diffusers_flow_sampler(args, spec):
    """A flow model's diffusers scheduler: FlowMatchEuler as configured, or a solver's flow variant (as SD3 users
    swap them in) for dpmpp_2m / unipc."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    sched_cfg = _diffusers_keys(spec, "flow_")
    solvers = {"dpmpp_2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
    if args.sampler in solvers and spec.kind != "flux":  # (FluxPipeline hands FlowMatchEuler its own grid)
        return solvers[args.sampler](use_flow_sigmas=True, prediction_type="flow_prediction",
                                     flow_shift=float(sched_cfg.get("shift", 1.0))), None
    note = None if args.sampler in (None, "euler") else (
        f"no matching diffusers flow scheduler for {args.sampler!r}: diffusers runs FlowMatchEulerDiscreteScheduler")
    return FlowMatchEulerDiscreteScheduler.from_config(sched_cfg), note


def _vae_latents(vae, pixels, generator):
    """A posterior draw of [-1, 1] ``pixels`` from ``generator``, shifted and scaled (FLUX.1's VAE latents)."""
    z = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def _diffusers_fill_inputs(vae, image, mask, generator, size):
    """FluxFillPipeline's extra input (B, h/2 * w/2, 4C + 4 f^2) at strength 1: the masked image's latents, then
    the pixel mask's f x f block per latent pixel (f: the VAE's pixels per latent pixel), both packed."""
    import torch

    from ..models.flux import pack

    b, (h, w) = image.shape[0], size
    f = image.shape[-1] // w
    masked = _vae_latents(vae, (image * 2 - 1) * (1 - mask), generator)
    blocks = mask[:, 0].reshape(b, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(b, f * f, h, w)
    return torch.cat([pack(masked), pack(blocks.to(masked))], dim=-1)


def _diffusers_flux_generate(model, scheduler, spec, b, steps, cfg, cond, device, dtype, seed, vae=None):
    """FluxPipeline's loop: packed latents, position ids, its sigma grid shifted by the resolution's mu, timestep /
    1000 and the guidance input; true CFG (cfg != 1) as one stacked batch (FluxPipeline's true_cfg_scale makes two
    calls: the same arithmetic; FluxFillPipeline and FluxControlPipeline have none). With the ``vae``: FLUX.1 Fill as
    FluxFillPipeline at strength 1 (the image encoded first, as its prepare_latents does; then the noise; then the
    masked image, whose latents and mask join the latents at every step; guidance 30), FLUX.1 Depth / Canny as
    FluxControlPipeline (the control image's latents, drawn before the noise, join the latents at every step)."""
    import numpy as np
    import torch

    from ..flow import dynamic_shift_mu
    from ..models.flux import pack

    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w, c = *spec.sample_size, spec.in_channels
    extra = None
    if spec.latent_control:  # (a tensor control image is encoded as it is: FluxControlPipeline does not normalise)
        extra = pack(_vae_latents(vae, cond["control_image"], g))
    if spec.inpainting:  # (at strength 1 the image's latents are unused; their draw is not)
        _vae_latents(vae, cond["image"] * 2 - 1, g)
    x = torch.randn((b, c, h, w), generator=g).to(device)
    latents = pack(x)
    if spec.inpainting:
        extra = _diffusers_fill_inputs(vae, cond["image"], cond["mask"], g, (h, w))
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float().to(device)
    txt_ids = torch.zeros(cond["states"].shape[1], 3, device=device)
    s = spec.scheduler
    mu = dynamic_shift_mu(latents.shape[1], s.get("base_image_seq_len", 256), s.get("max_image_seq_len", 4096),
                          s.get("base_shift", 0.5), s.get("max_shift", 1.15)) if s.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
    guided = cfg != 1.0
    ctx = torch.cat([cond["states"], cond["negative_states"]]) if guided else cond["states"]
    pooled = torch.cat([cond["text_embeds"], cond["negative_text_embeds"]]) if guided else cond["text_embeds"]
    n = ctx.shape[0]
    guidance = torch.full((n,), 30.0 if spec.inpainting else 3.5, device=device) if spec.guidance_input else None
    if extra is not None:
        extra = (torch.cat([extra, extra]) if guided else extra).to(dtype)
    for t in scheduler.timesteps:
        x_in = torch.cat([latents, latents]) if guided else latents
        if extra is not None:
            x_in = torch.cat([x_in.to(dtype), extra], dim=2)
        out = model(hidden_states=x_in.to(dtype), timestep=t.expand(n).to(dtype) / 1000, guidance=guidance,
                    pooled_projections=pooled, encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=img_ids).sample
        out = out.float()
        if guided:
            cond_out, uncond_out = out.chunk(2)
            out = uncond_out + cfg * (cond_out - uncond_out)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


def diffusers_vae(vae):
    """A diffusers AutoencoderKL holding a fastdiff VAE's weights (both halves: diffusers' names)."""
    import diffusers

    config = {k: v for k, v in vae.config.to_dict().items() if k != "extra"}
    theirs = diffusers.AutoencoderKL(**config)
    theirs.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    return theirs.eval()


def _diffusers_inpaint_inputs(vae, image, mask, size, generator):
    """StableDiffusionInpaintPipeline's extra UNet input (B, 1 + C, h, w): the mask at the latents' size (nearest)
    and the masked image's latents (a posterior draw from ``generator``; its mean for None), scaled."""
    import torch

    masked = (image * 2 - 1) * (mask < 0.5)
    dist = vae.encode(masked.to(vae.dtype)).latent_dist
    latents = (dist.mean if generator is None else dist.sample(generator)) * vae.config.scaling_factor
    small = torch.nn.functional.interpolate(mask, size=size)
    return torch.cat([small.to(latents), latents], dim=1)


def _diffusers_generate(model, scheduler, spec, b, steps, cfg, cond, device, dtype, seed, controlnet=None, vae=None):
    """One diffusers-pipeline style sampling loop (as DiTPipeline / StableDiffusionPipeline do; with ``controlnet``,
    as StableDiffusionControlNetPipeline does; an inpainting UNet with its ``vae``, as StableDiffusionInpaintPipeline
    at strength 1: the masked image encoded, then its latents and the mask beside the sample at every step)."""
    import torch

    if spec.kind == "flux":
        return _diffusers_flux_generate(model, scheduler, spec, b, steps, cfg, cond, device, dtype, seed, vae)

    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w = spec.sample_size
    c = spec.in_channels
    latents = torch.randn((b, c, h, w), generator=g).to(device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    guided = cfg != 1.0
    extra = None
    if spec.inpainting:  # (b, 1 + C, h, w), the same for both CFG passes
        extra = _diffusers_inpaint_inputs(vae, cond["image"], cond["mask"], (h, w), g).to(dtype)
        extra = torch.cat([extra, extra]) if guided else extra
    elif spec.low_res_channels:  # guided-diffusion's upsamplers: the image in [-1, 1], bilinear to the sample size;
        import torch.nn.functional as F  # SD's upscaler: at the latents' size, noised to its pipeline's default level

        extra = F.interpolate(cond["image"].to(device) * 2 - 1, (h, w), mode="bilinear")
        if spec.low_res_noise:
            import diffusers

            low = diffusers.DDPMScheduler.from_config({k: v for k, v in spec.low_res_noise["scheduler"].items()
                                                       if not k.startswith("_")})
            from ..checkpoints.diffusers_folder import UPSCALER_NOISE_LEVEL

            level = torch.tensor([UPSCALER_NOISE_LEVEL], device=device)
            extra = low.add_noise(extra, torch.randn(extra.shape, generator=g).to(device), level)
            kw_labels = level.expand(2 * b if guided else b)
        extra = extra.to(dtype)
        extra = torch.cat([extra, extra]) if guided else extra
    kw = {}
    if spec.low_res_noise:  # (the noise level, both passes' class label)
        kw["class_labels"] = kw_labels
    elif cond["labels"] is not None:
        kw["class_labels"] = torch.cat([cond["labels"], cond["null_labels"]]) if guided else cond["labels"]
    if cond["states"] is not None:
        kw["encoder_hidden_states"] = (torch.cat([cond["states"], cond["negative_states"]]) if guided
                                       else cond["states"])
    if cond["text_embeds"] is not None:  # SDXL / SD3: the pooled text (and SDXL's default time ids)
        kw["added_cond_kwargs"] = dict(text_embeds=torch.cat([cond["text_embeds"], cond["negative_text_embeds"]])
                                       if guided else cond["text_embeds"])
        if spec.time_ids_dim:
            from ..text_time import default_time_ids

            ids, neg = (torch.tensor([default_time_ids(spec.time_ids_dim, h, w, negative=n)], device=device,
                                     dtype=dtype).expand(b, -1) for n in (False, True))
            kw["added_cond_kwargs"]["time_ids"] = torch.cat([ids, neg]) if guided else ids
    for t in scheduler.timesteps:
        x_in = torch.cat([latents, latents]) if guided else latents
        if hasattr(scheduler, "scale_model_input"):  # (FlowMatch schedulers have none: SD3's pipeline skips it)
            x_in = scheduler.scale_model_input(x_in, t)
        if extra is not None:
            x_in = torch.cat([x_in.to(dtype), extra], dim=1)
        ts = t.expand(x_in.shape[0]) if spec.kind in ("dit", "mmdit") else t
        if spec.kind == "mmdit":  # StableDiffusion3Pipeline's call
            out = model(hidden_states=x_in.to(dtype), timestep=ts, encoder_hidden_states=kw["encoder_hidden_states"],
                        pooled_projections=kw["added_cond_kwargs"]["text_embeds"]).sample
        elif spec.kind == "dit":
            out = model(x_in.to(dtype), timestep=ts, class_labels=kw["class_labels"]).sample
        elif controlnet is not None:
            image = torch.cat([cond["control_image"]] * 2) if guided else cond["control_image"]
            down, mid = controlnet(x_in.to(dtype), ts, controlnet_cond=image, conditioning_scale=1.0,
                                   return_dict=False, **kw)
            out = model(x_in.to(dtype), ts, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        **kw).sample
        else:
            out = model(x_in.to(dtype), ts, **{k: v for k, v in kw.items()}).sample
        out = out.float()
        if spec.learned_variance:
            out = out[:, :c]
        if guided:
            cond_out, uncond_out = out.chunk(2)
            out = uncond_out + cfg * (cond_out - uncond_out)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


def _bench_diffusers(args, pipe_source, compare, batches, device, log, on_row=None) -> list[dict]:
    """Rows for diffusers eager (and torch.compile of it): each row passed to ``on_row`` as soon as measured."""
    import torch

    import fastdiff

    from ..runtime.config import DTYPES
    from ..runtime.timing import measure

    impls = ["diffusers"] + (["diffusers+compile"] if "compile" in compare else [])
    try:
        schedulers = _import_diffusers()
    except ImportError as e:
        return [dict(impl=i, batch=b, status="skipped", reason=_one_line(e)) for i in impls for b in batches]
    try:
        pipe = fastdiff.load(pipe_source, device="cpu", **load_options(args))
        model, note = build_diffusers_model(pipe)
        dtype = DTYPES[args.dtype] if args.dtype else pipe.dtype  # (the checkpoint's precision, as fastdiff's)
        model = model.to(device=device, dtype=dtype)
        encodes = pipe.spec.inpainting or pipe.spec.latent_control  # (float32, as fastdiff's)
        vae = diffusers_vae(pipe.vae).to(device) if encodes else None
        controlnet = None
        net = bench_controlnet(pipe, args.controlnet, args.seed)
        if net is not None:  # the same ControlNet in diffusers' class
            from ..checkpoints.controlnet import diffusers_config

            import diffusers

            config = {k: v for k, v in diffusers_config(net).items() if not k.startswith("_")}
            controlnet = diffusers.ControlNetModel.from_config(config)
            controlnet.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
            controlnet = controlnet.eval().to(device=device, dtype=dtype)
        spec = pipe.spec
        scheduler, snote = _diffusers_sampler(args, spec, schedulers)
    except Exception as e:  # no counterpart / weights that do not map: skipped; a device error is a failure
        from ..errors import FastdiffError

        status = "skipped" if isinstance(e, (ValueError, NotImplementedError, ImportError, FastdiffError)) else \
            "failed"
        return [dict(impl=i, batch=b, status=status, reason=f"diffusers model not built: {_one_line(e)}")
                for i in impls for b in batches]
    notes = [n for n in (note, snote) if n]
    if args.cfg != 1.0 and (spec.inpainting or spec.latent_control) and spec.kind == "flux":
        notes.append("FluxFillPipeline / FluxControlPipeline have no true CFG: the loop guides as FluxPipeline's "
                     "true_cfg_scale, in one stacked batch")
    rows = []
    for impl in impls:
        runner, control_runner = model, controlnet
        compile_s = None
        if impl == "diffusers+compile":
            mode = args.compile_mode or ("max-autotune" if device.type == "cuda" else "default")
            notes_c = notes + [f"torch.compile(mode={mode!r})"]
            # (one static shape per batch, as fastdiff's compile backend: not a dynamic-batch graph after the first)
            runner = torch.compile(model, mode=mode, dynamic=False)
            control_runner = None if controlnet is None else torch.compile(controlnet, mode=mode, dynamic=False)
        else:
            notes_c = notes
        for b in batches:
            log(f"  {impl:12s} batch {b} ...")
            row = dict(impl=impl, batch=b, scheduler=type(scheduler).__name__, notes=notes_c)
            try:
                control = net if net is not None else pipe._control_format() if spec.latent_control else None
                cond = _conditioning(spec, b, args.cfg, args.seed, device, dtype, control=control,
                                     pixels=image_pixels(pipe))
                if args.cfg != 1.0 and spec.num_classes and cond["null_labels"] is None:
                    raise ValueError("cfg != 1 needs a null class label")
                fn = lambda: _diffusers_generate(runner, scheduler, spec, b, args.steps, args.cfg, cond,  # noqa: E731
                                                 device, dtype, args.seed, control_runner, vae)
                with torch.no_grad():
                    m = measure(fn, device, warmup=args.warmup, repeat=args.repeat)
                nfe = len(scheduler.timesteps)
                row.update(_row_stats(m, b, args.steps, nfe), status="ok")
                log(_row_line(row))
            except Exception as e:
                row.update(status="failed", reason=f"{type(e).__name__}: {_one_line(e)}",
                           detail=traceback.format_exc(limit=3))
            rows.append(row)
            if on_row is not None:
                on_row(row)
        del compile_s
    return rows
