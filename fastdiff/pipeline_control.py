"""The Pipeline's ControlNet side: attaching ControlNets (``set_controlnet``) and turning ``generate``'s control
arguments into the network's inputs, for a text UNet's ControlNets, SD3's and FLUX.1's, and FLUX.1 Depth / Canny's
control latents (``fastdiff.controlnet`` holds the pieces that need no Pipeline).

``Pipeline`` inherits these methods; they read its ``model``, ``spec``, ``vae``, ``controlnet``, ``runner`` and
``device``.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Optional

import torch

from .errors import BadArgumentError
from .utils.checks import one_or

if TYPE_CHECKING:
    from .pipeline import Pipeline


class ControlNetMixin:
    """``set_controlnet`` and the ``_control*`` helpers of ``Pipeline.generate``."""

    def _controlnet_inputs(self, control: torch.Tensor, b: int, plan, noise, guided: bool, images, masks,
                           cond: dict, scale, start, end, guess_mode: bool, control_mode,
                           control_masks=None, window_plan=None) -> tuple[dict, dict]:
        """(the conditional pass's ControlNet inputs, the unconditional pass's) for ``b`` samples: the control
        images (an SD3 / FLUX.1 ControlNet's encoded to latents, FLUX.1's posteriors drawn here, before the start
        noise; an SD3 inpainting ControlNet's with its ``control_masks``), scales, step windows and guess mode
        (``fastdiff.controlnet.control_inputs``; the windows span ``window_plan``, the grid before a base run's
        cut); a FLUX.1 Union ControlNet's types; under true CFG a FLUX.1 ControlNet reads the conditional text in
        both passes."""
        from .controlnet import check_control_options, control_inputs

        control_format = self._control_format()
        if scale is None:
            scale = self._default_control_scale(images is not None, masks is not None)
        # (diffusers: a ControlNet that pools its outputs guides the conditional pass only)
        guess_mode = guess_mode or bool(getattr(control_format, "global_pool_conditions", False))
        scales, starts, ends, _ = check_control_options(scale, start, end, guess_mode,
                                                        getattr(control_format, "count", None) or 1)
        if self._latent_controlnet():
            control = self._controlnet_latents(control, b, noise, images, control_masks)
        added, added_uncond = control_inputs(control, b, plan, scales, starts, ends, guess_mode, guided, self.device,
                                             self._network_dtype(), window_plan)
        if self._latent_controlnet() == "flux":
            added.update(self._control_modes(control_mode, b))
            if guided:  # (true CFG: both passes' ControlNet reads the conditional text, shared by the passes)
                added.update(control_encoder_hidden_states=cond["encoder_hidden_states"],
                             control_text_embeds=cond["text_embeds"])
        elif control_mode is not None:
            raise BadArgumentError("control_mode: a FLUX.1 Union ControlNet's control type; this pipeline's "
                                   "ControlNet takes none")
        return added, added_uncond

    def set_controlnet(self, controlnet, variant: Optional[str] = None) -> "Pipeline":
        """Drive the network with a ControlNet: a diffusers ``ControlNetModel`` folder for a text UNet
        (``SD3ControlNetModel`` for SD3, ``FluxControlNetModel`` for FLUX.1), a loaded one (a copy is taken: the
        pipeline moves, casts and fuses its own), a list of those (diffusers' Multi* ControlNet models: their outputs
        add up, and ``generate`` then takes lists: one image, scale and window per ControlNet; one named twice is
        loaded once, as a FLUX.1 Union ControlNet given several images and modes runs), or None to take it
        away. It is put on the network's device and dtype, and the runner is rebuilt around both (with
        ``optimize()``'s settings, applied to the ControlNet too: its graphs capture both networks; an onnxruntime /
        TensorRT backend exports a UNet and its ControlNet in one graph again), so ``generate`` then takes
        ``control_image=``. If that fails, the pipeline stays as it was."""
        import copy
        import os

        from .models.controlnet import controlnet_family

        self._require_model("set_controlnet()")
        if controlnet is not None and self.spec.low_res_noise is not None:  # (no diffusers pipeline runs one there)
            raise BadArgumentError("set_controlnet: an upscaler (StableDiffusionUpscalePipeline) takes no ControlNet")
        if controlnet is not None:
            family = controlnet_family(self.model)  # (its ControlNet class, their sum, the fit check)
            if family is None:
                raise BadArgumentError(f"set_controlnet: a ControlNet drives a text-conditioned UNet (SD 1.x / 2.x / "
                                       f"SDXL), an SD3 or a FLUX.1 transformer, and this model is a {self.spec.kind} "
                                       f"{type(self.model).__name__}")
            from .checkpoints.controlnet import load_controlnet

            net_class, several_class, check_fits = family
            several = isinstance(controlnet, (list, tuple))
            loaded = {}  # (one ControlNet named twice is one module: a Union ControlNet given several modes)

            def one(c):
                key = os.path.realpath(c) if isinstance(c, (str, os.PathLike)) else id(c)
                if key not in loaded:
                    loaded[key] = copy.deepcopy(c) if isinstance(c, torch.nn.Module) else load_controlnet(
                        c, variant=variant)
                return loaded[key]

            nets = [one(c) for c in (controlnet if several else [controlnet])]
            if not nets:
                raise BadArgumentError("set_controlnet: expected a ControlNet or a list of them, found an empty list")
            for net in nets:
                if not isinstance(net, net_class):
                    raise BadArgumentError(f"set_controlnet: a {type(net).__name__} cannot drive a "
                                           f"{type(self.model).__name__} (ControlNetModels drive text UNets, "
                                           f"SD3ControlNetModels SD3, FluxControlNetModels FLUX.1)")
                check_fits(net, self.model)
                f = getattr(self.vae, "downscale", None)
                if getattr(net, "reads_pixels", False) and f is not None and f != net.image_downscale:
                    raise BadArgumentError(f"set_controlnet: this XLabs ControlNet's hint encoder reads "
                                           f"{net.image_downscale} pixels per latent pixel, and this pipeline's VAE "
                                           f"{f}; expected one scale")
                if hasattr(net, "share_positions"):  # (SD3.5's ControlNets read the transformer's patch embedding)
                    net.share_positions(self.model)
            controlnet = several_class(nets) if several else nets[0]
            controlnet = controlnet.to(device=self.device, dtype=self._network_dtype())
        previous = self.controlnet
        self.controlnet = controlnet
        try:
            self._rebuild_runner()
        except BaseException:
            self.controlnet = previous
            raise
        return self

    def _rebuild_runner(self) -> None:
        """The runner built again around the network as it now is (a ControlNet set, FreeU switched): with
        ``optimize()``'s settings, its captured graphs and loops new (those of before ran the old network)."""
        if self.config is None:
            from .models.controlnet import controlled

            runner, notes = (self.model if self.controlnet is None else controlled(self.model, self.controlnet)), []
        else:
            from .runtime.runners import build_runner

            runner, notes = build_runner(self, self.config, graph_factory=self._graph_factory)
        self.runner = runner
        self.notes.extend(notes)
        if self.loop_graphs is not None:
            from .runtime.loop_graph import LoopGraphCache

            self.loop_graphs = LoopGraphCache(self.config.max_graphs, self._graph_factory)

    def _control_images(self, control_image, scale, start, end, guess_mode):
        """generate(control_image=...) as float32 images in [0, 1] ((k, C, H, W); (k, K, C, H, W) for K ControlNets),
        its options checked; None without a ControlNet (whose options are then refused if set)."""
        from .controlnet import check_control_options, control_images

        control_format = self._control_format()
        count = getattr(control_format, "count", None)
        check_control_options(scale, start, end, guess_mode, count or 1)
        if self.spec.latent_control:  # FLUX.1 Depth / Canny: the image is an input, not a ControlNet's
            changed = [name for name, value, default in (
                ("controlnet_conditioning_scale", scale, None), ("control_guidance_start", start, 0.0),
                ("control_guidance_end", end, 1.0), ("guess_mode", guess_mode, False)) if value != default]
            if changed:
                raise BadArgumentError(f"{', '.join(changed)}: a ControlNet's options; FLUX.1 Depth / Canny reads its "
                                       f"control image's latents as input channels, at no scale or step window")
            if control_image is None:
                raise BadArgumentError("control_image: this FLUX.1 Depth / Canny transformer reads a control image's "
                                       "latents beside its own: expected one, found none")
            from .img2img import check_whole_pixels, unit_images

            try:  # (an image its VAE encodes: read as img2img's, [-1, 1] arrays and tensors too)
                images = unit_images(control_image, control_format.conditioning_channels)
            except BadArgumentError as e:
                raise BadArgumentError("control_image" + str(e)[len("image"):]) from None
            check_whole_pixels(images, control_format.image_downscale, "control_image", "the VAE's")
            return images
        if control_format is None:
            changed = (["control_image"] if control_image is not None else []) + [
                name for name, value, default in (
                    ("controlnet_conditioning_scale", scale, None), ("control_guidance_start", start, 0.0),
                    ("control_guidance_end", end, 1.0), ("guess_mode", guess_mode, False)) if value != default]
            if changed:
                raise BadArgumentError(f"{', '.join(changed)}: given, but this pipeline has no ControlNet "
                                       f"(pipe.set_controlnet(FOLDER) first)")
            return None
        if control_image is None:
            raise BadArgumentError("control_image: this pipeline is driven by a ControlNet: expected its conditioning "
                                   "image, found none" + (" (pipe.set_controlnet(None) takes the ControlNet away)"
                                                          if self.controlnet is not None else ""))
        if getattr(control_format, "latent", False) and guess_mode:
            raise BadArgumentError("guess_mode: the SD3 and FLUX.1 ControlNet pipelines have none")
        # (a FLUX.1 ControlNet's image is encoded by the VAE: read as img2img's, [-1, 1] arrays and tensors too)
        latent = getattr(control_format, "latent", False)
        return control_images(control_format, control_image, count, raw=not latent, rows_first=not latent)

    def _control_latents(self, control: torch.Tensor, b: int, noise) -> torch.Tensor:
        """FLUX.1 Depth / Canny's extra input (b, C, h, w): the control images (one, or one per sample; in [0, 1])
        encoded by the VAE, each sample's posterior drawn from its own generator, as FluxControlPipeline does."""
        control = _per_sample_rows(control, b)
        if self.vae is None or self.vae.encoder is None:
            raise BadArgumentError("control_image: this model reads its control image's VAE latents (FLUX.1 Depth / "
                                   "Canny, an SD3 / FLUX.1 ControlNet), and this pipeline "
                                   + ("has no VAE (fastdiff.load(..., vae='AutoencoderKL folder'))"
                                      if self.vae is None else "VAE's weights carry only the decoder"))
        return self.vae.encode(control * 2 - 1, noise=noise)

    def _default_control_scale(self, edits: bool, inpaints: bool) -> float:
        """diffusers' ControlNet pipelines' default scale: 1.0; 0.8 for img2img; 0.5 for SD inpainting (SDXL's 1.0);
        SD3's and FLUX.1's 1.0 for every task."""
        if self._latent_controlnet():
            return 1.0
        if inpaints:
            return 1.0 if self.spec.time_ids_dim else 0.5
        return 0.8 if edits else 1.0

    def _control_format(self):
        """What drives the network: the ControlNet (a MultiControlNet: with ``count``), or (a loaded ONNX graph
        exported with one) its image format, all with ``conditioning_channels`` and ``image_downscale``; for FLUX.1
        Depth / Canny (``spec.latent_control``) the image its VAE encodes (``latent``); None."""
        if self.spec.latent_control:
            return types.SimpleNamespace(conditioning_channels=3, image_downscale=getattr(self.vae, "downscale", 8),
                                         latent=True)
        if self._latent_controlnet():  # (its image is encoded by the VAE, as FLUX.1 Depth's; XLabs' by its own)
            net = self._latent_net()
            downscale = net.image_downscale if getattr(net, "reads_pixels", False) else getattr(self.vae, "downscale",
                                                                                                   8)
            return types.SimpleNamespace(conditioning_channels=3, image_downscale=downscale, latent=True,
                                         count=net.count, global_pool_conditions=False)
        if self.controlnet is not None:
            nets = getattr(self.controlnet, "nets", None)
            return self.controlnet if nets is None else types.SimpleNamespace(
                conditioning_channels=self.controlnet.conditioning_channels,
                image_downscale=self.controlnet.image_downscale, count=len(nets),
                global_pool_conditions=nets[0].global_pool_conditions)  # (diffusers reads the first one's)
        io = getattr(self.runner, "io", None)
        control = io.get("control") if isinstance(io, dict) else None
        return None if control is None else types.SimpleNamespace(**control)

    def _control_masks(self, control_mask, control: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """generate(control_mask=...): an SD3 inpainting ControlNet's masks (white: repaint) as float32 (k, 1, H, W)
        at the control image's size: PIL images and arrays binarized as diffusers' mask processor reads them
        (``fastdiff.inpaint.unit_masks``); tensors as they are (StableDiffusion3ControlNetInpaintingPipeline hands
        them on unprocessed: pixels above 0.5 are masked, and the ControlNet reads the soft mask); None for any other
        pipeline, which refuses a mask given."""
        if not (self._latent_controlnet() == "sd3" and self._latent_net().inpaints):
            if control_mask is not None:
                raise BadArgumentError("control_mask: the mask of an SD3 inpainting ControlNet (its "
                                       "extra_conditioning_channels); this pipeline has "
                                       + ("no ControlNet" if self._control_format() is None else "a ControlNet that "
                                          "reads none") + " (mask_image= with image= inpaints an image)")
            return None
        if control_mask is None:
            raise BadArgumentError("control_mask: this SD3 inpainting ControlNet repaints the masked part of its "
                                   "control image: expected a mask (white: repaint), found none")
        from .inpaint import unit_masks

        try:
            return unit_masks(control_mask, control if control.dim() == 4 else control[:, 0], binarize_tensors=False)
        except BadArgumentError as e:
            raise BadArgumentError("control_mask" + str(e)[len("mask_image"):]) from None

    def _controlnet_latents(self, control: torch.Tensor, b: int, noise, images, control_masks=None):
        """An SD3 / FLUX.1 ControlNet's input: the control images (k, [K,] 3, H, W) in [0, 1] encoded by the VAE,
        (b, [K,] C, h, w), ControlNet by ControlNet (XLabs' FLUX.1 ControlNets: the images in [-1, 1], which their
        hint encoder reads). FLUX.1's: each sample's posterior from its own generator, before
        an image's (FluxControlNetPipeline's order, its img2img and inpainting siblings' too). SD3's: the posterior's
        mean (diffusers draws from torch's global RNG there, which no seed reproduces), without the VAE's shift for
        InstantX's ControlNets, as StableDiffusion3ControlNetPipeline shifts them. An SD3 inpainting ControlNet's
        (StableDiffusion3ControlNetInpaintingPipeline): the image with its masked pixels black, encoded, then the
        inverted mask at the latent size (nearest)."""
        net = self._latent_net()
        if self._latent_controlnet() == "sd3":
            if images is not None:
                raise BadArgumentError("image: an SD3 ControlNet with an image to edit is not implemented (no "
                                       "diffusers pipeline does it); to inpaint, an SD3 inpainting ControlNet takes "
                                       "the image as control_image and the mask as control_mask")

            masks = control_masks
            if masks is not None and masks.shape[0] not in (1, b):
                raise BadArgumentError(f"control_mask: expected {one_or(b, 'masks')} (one per sample), found "
                                       f"{masks.shape[0]}")

            def encode(images, b, noise):
                if masks is not None:  # (the masked pixels black: -1 once mapped to [-1, 1])
                    images = images * (masks <= 0.5)
                z = self._control_latents(images, b, None)  # (b, C, h, w): (mean - shift) * scale
                if not net.vae_shift:
                    z = z + self.vae.config.shift_factor * self.vae.config.scaling_factor
                if masks is not None:  # (b, C + 1, h, w): the part to keep, 1
                    keep = 1 - torch.nn.functional.interpolate(masks, size=tuple(z.shape[-2:]))
                    z = torch.cat([z, keep.to(z).expand(z.shape[0], -1, -1, -1)], dim=1)
                return z
        elif net.reads_pixels:  # XLabs': the image itself, in [-1, 1] (nothing drawn)
            def encode(images, b, noise):
                return _per_sample_rows(images, b) * 2 - 1
        else:
            encode = self._control_latents
        if control.dim() == 4:
            return encode(control, b, noise)
        return torch.stack([encode(control[:, k], b, noise) for k in range(control.shape[1])], dim=1)

    def _control_modes(self, control_mode, b: int) -> dict:
        """{"control_mode": (b,) or (b, K) int64} for Union ControlNets (one type per ControlNet), {} for none."""
        info = self._latent_net()
        nets = getattr(info, "nets", None) or [info]
        unions = [net.num_mode for net in nets]
        if isinstance(control_mode, (list, tuple)):
            modes = list(control_mode)
        elif len(nets) > 1 and any(top is not None for top in unions):  # (one type for every Union one, as diffusers)
            modes = [None if top is None else control_mode for top in unions]
        else:
            modes = [control_mode] * len(nets)
        if len(modes) != len(nets):
            raise BadArgumentError(f"control_mode: expected one per ControlNet ({len(nets)}), found {len(modes)}")
        for mode, top in zip(modes, unions):
            if top is None and mode is not None:
                raise BadArgumentError(f"control_mode: given ({mode!r}) for a FLUX.1 ControlNet that is not a Union "
                                       f"one (it has no control types)")
            if top is not None and (isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode < top):
                raise BadArgumentError(f"control_mode: this Union ControlNet takes a control type, an int in [0, "
                                       f"{top}), found {mode!r}")
        if all(top is None for top in unions):
            return {}
        # (a tensor input: a captured loop takes another type without a recapture; 0 for a net without types)
        t = torch.tensor([0 if m is None else m for m in modes], dtype=torch.int64, device=self.device)
        several = getattr(info, "nets", None) is not None
        return {"control_mode": t[None].expand(b, -1).contiguous() if several else t.expand(b).contiguous()}

    def _latent_controlnet(self) -> Optional[str]:
        """"flux" / "sd3" when a FLUX.1 / SD3 ControlNet drives the network (it reads its image's VAE latents),
        else None."""
        from .models.flux_controlnet import FluxControlNet, MultiFluxControlNet
        from .models.sd3_controlnet import MultiSD3ControlNet, SD3ControlNet

        if isinstance(self.controlnet, (FluxControlNet, MultiFluxControlNet)):
            return "flux"
        if isinstance(self.controlnet, (SD3ControlNet, MultiSD3ControlNet)):
            return "sd3"
        control = self._graph_control()  # (a loaded graph exported with its ControlNet)
        return None if control is None else control.get("latent")

    def _graph_control(self) -> Optional[dict]:
        """The control input a loaded graph was exported with (``fastdiff.export.onnx.control_format``), or None."""
        if self.controlnet is not None:
            return None
        io = getattr(self.runner, "io", None)
        control = io.get("control") if isinstance(io, dict) else None
        return control if isinstance(control, dict) else None

    def _latent_net(self):
        """What the pipeline reads of an SD3 / FLUX.1 ControlNet to make its inputs (``vae_shift``, ``inpaints``,
        ``reads_pixels``, ``image_downscale``, ``count``, Union types): the attached one, or the description a
        loaded graph's metadata keeps of the one it was exported with."""
        if self.controlnet is not None:
            return self.controlnet
        c = self._graph_control()
        nets = [types.SimpleNamespace(num_mode=m) for m in (c.get("num_mode") or [None] * (c.get("count") or 1))]
        info = types.SimpleNamespace(vae_shift=c["vae_shift"], inpaints=c["inpaints"], reads_pixels=c["reads_pixels"],
                                     image_downscale=c["image_downscale"], count=c.get("count"),
                                     num_mode=nets[0].num_mode)
        if c.get("count"):
            info.nets = nets
        return info

    def _control_size(self, control: torch.Tensor, height, width) -> tuple[int, int]:
        """The latent size a control image fixes (checked against any height / width given)."""
        f = self._control_format().image_downscale
        big_h, big_w = int(control.shape[-2]), int(control.shape[-1])
        h, w = big_h // f, big_w // f
        if (height is not None and height != h) or (width is not None and width != w):
            raise BadArgumentError(f"height / width: the control image ({big_h}x{big_w} "
                                   f"pixels) fixes the latent size to {h}x{w}, found {height}x{width}")
        return h, w


def _per_sample_rows(control: torch.Tensor, b: int) -> torch.Tensor:
    """Control images (1 or b, C, H, W) as (b, C, H, W): one for every sample, or one each."""
    if control.shape[0] not in (1, b):
        raise BadArgumentError(f"control_image: expected {one_or(b, 'images')} (one per sample), found "
                               f"{control.shape[0]}")
    return control.expand(b, -1, -1, -1)


__all__ = ["ControlNetMixin"]
