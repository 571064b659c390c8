"""``fastdiff bench``'s inputs, the same for fastdiff and diffusers: labels, text states and a ControlNet with its
image, all drawn from the run's seed."""

from __future__ import annotations


def image_pixels(pipe) -> int:
    """Image pixels per latent pixel: the pipe's VAE's (an inpainting network's image is in pixels), else SDXL's 8."""
    from ..text_time import VAE_SCALE_FACTOR

    return pipe.vae.downscale if getattr(pipe, "vae", None) is not None else VAE_SCALE_FACTOR


def _conditioning(spec, b: int, cfg: float, seed: int, device, dtype, control=None, pixels: int = 8):
    """dict of (labels, null_labels, states, negative_states, text_embeds, negative_text_embeds, control_image,
    image, mask) for batch b (None where not used; ``image``: an inpainting network's, or a super-resolution model's
    low-resolution image; SDXL-style models get random pooled embeddings and their default
    time ids; ``control``: what drives the network (``conditioning_channels``, ``image_downscale``): a random control
    image in [0, 1]; an inpainting network: a random image in [0, 1] and a mask repainting its centre, ``pixels``
    image pixels per latent pixel)."""
    import torch

    cond = {"labels": None, "null_labels": None, "states": None, "negative_states": None, "text_embeds": None,
            "negative_text_embeds": None, "control_image": None, "image": None, "mask": None}
    if spec.inpainting:
        (h, w), f = spec.sample_size, pixels
        g = torch.Generator().manual_seed(seed + 4)
        cond["image"] = torch.rand(b, 3, f * h, f * w, generator=g).to(device)
        mask = torch.zeros(b, 1, f * h, f * w)
        mask[:, :, f * h // 4: 3 * f * h // 4, f * w // 4: 3 * f * w // 4] = 1.0  # white repaints: the centre
        cond["mask"] = mask.to(device)
    if spec.low_res_channels:  # a super-resolution model: a random image its default upscale below the sample size
        (h, w), f = spec.sample_size, spec.low_res_upscale
        g = torch.Generator().manual_seed(seed + 4)
        cond["image"] = torch.rand(b, spec.low_res_channels, max(1, h // f), max(1, w // f), generator=g).to(device)
    if control is not None:
        (h, w), f = spec.sample_size, control.image_downscale
        g = torch.Generator().manual_seed(seed + 2)
        image = torch.rand(b, control.conditioning_channels, f * h, f * w, generator=g)
        cond["control_image"] = image.to(device, dtype)
    if spec.num_classes and not spec.low_res_noise:  # (an upscaler's class input is its noise level)
        cond["labels"] = torch.arange(b, device=device) % spec.num_classes
        if spec.null_class is not None:
            cond["null_labels"] = torch.full((b,), spec.null_class, device=device, dtype=torch.long)
    if spec.cross_attention_dim:
        g = torch.Generator().manual_seed(seed + 1)
        shape = (b, spec.text_tokens, spec.cross_attention_dim)
        cond["states"] = torch.randn(shape, generator=g).to(device, dtype)
        cond["negative_states"] = torch.randn(shape, generator=g).to(device, dtype)
        if spec.text_embeds_dim:
            cond["text_embeds"] = torch.randn(b, spec.text_embeds_dim, generator=g).to(device, dtype)
            cond["negative_text_embeds"] = torch.randn(b, spec.text_embeds_dim, generator=g).to(device, dtype)
    return cond


def bench_controlnet(pipe, source, seed: int):
    """The ControlNet a bench runs: a folder's; ``random``: ``ControlNet.from_unet`` of the pipe's UNet with seeded
    random zero convolutions (from_unet's zeros would make it change nothing); None: the pipe's own (its folder's
    controlnet/), or none."""
    import torch

    if source is None:
        return pipe.controlnet
    if source != "random":
        from ..checkpoints.controlnet import load_controlnet

        return load_controlnet(source)
    from ..errors import BadArgumentError
    from ..models.controlnet import ControlNet
    from ..models.unet import UNet

    if not isinstance(pipe.model, UNet):
        raise BadArgumentError(f"--controlnet random: a ControlNet made from the model's UNet, and this model is a "
                               f"{pipe.spec.kind}; give a ControlNet folder (FluxControlNetModel for FLUX.1)")
    net = ControlNet.from_unet(pipe.model)
    g = torch.Generator().manual_seed(seed + 3)  # (on the CPU: the same ControlNet whatever the device)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, *net.controlnet_cond_embedding.modules()]:
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.copy_((torch.randn(conv.weight.shape, generator=g) * 0.02).to(conv.weight))
    return net
