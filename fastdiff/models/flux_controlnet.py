"""FLUX.1 ControlNets (InstantX / Shakker-Labs style), as diffusers' ``FluxControlNetModel``, and a FLUX.1
transformer driven by one or several.

A FLUX.1 ControlNet is a shorter copy of the transformer (a few double- and single-stream blocks) whose image tokens
also read the control image's VAE latents, packed like the latents and projected by a zero-initialised linear layer
(``controlnet_x_embedder``). Each block's image tokens pass through a zero-initialised linear layer
(``controlnet_blocks`` / ``controlnet_single_blocks``), are weighted by ``controlnet_conditioning_scale``, and are
added to the transformer's image tokens after its blocks (``Flux.forward(block_residuals=, single_residuals=)``).
A Union ControlNet (``num_mode``) also takes the control type (canny, depth, pose, ...: ``control_mode``), whose
embedding goes before the text tokens. Parameter names are diffusers', so a ``FluxControlNetModel`` folder loads as
it is (``fastdiff.checkpoints.controlnet``).

Per sample, the network takes:

* ``control_image`` (B, C, H, W): the control image's VAE latents (unpacked, like the latents; the pipeline encodes
  the image, each sample's posterior drawn from its own generator before the start noise, as FluxControlNetPipeline);
* ``control_scale`` (B,): the conditioning scale, 0 outside the sample's ``control_guidance_start`` / ``_end``
  window (``fastdiff.controlnet.ControlWindow``);
* ``control_mode`` (B,) int64: a Union ControlNet's control type.

Several ControlNets (diffusers' ``FluxMultiControlNetModel``) take them stacked on a second axis, and their outputs
add up; a Union ControlNet given several images and modes at once is one module named once per image
(``set_controlnet([FOLDER, FOLDER])`` loads it once), as diffusers' ``FluxMultiControlNetModel([union])`` runs it.

XLabs' ControlNets (``conditioning_embedding_channels``) read the control image itself, not its latents: a
pixel-space hint encoder (diffusers' ``ControlNetConditioningEmbedding``, 8x down) maps it (B, 3, 8H, 8W) in
[-1, 1] to (B, K, H, W), packed like the latents; their outputs repeat over the transformer's double blocks
(block i reads output i % outputs: diffusers' ``controlnet_blocks_repeat``). Their configs name ``patch_size`` 2,
the packing's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import BadArgumentError, UnsupportedConfigError
from .controlnet import ConditioningEmbedding, scaled
from .flux import (Flux, FluxConfig, FluxSingleTransformerBlock, FluxTransformerBlock, PACK,
                   TimeGuidanceTextEmbedding, embed_conditioning, pack, position_ids, rotary_tables)

CLASS_NAME = "FluxControlNetModel"
HINT_CHANNELS = (16, 16, 16, 16)  # XLabs' hint encoder (diffusers' FluxControlNetModel builds it so): 8x down


class FluxControlNet(nn.Module):
    """diffusers' ``FluxControlNetModel`` (XLabs' too: ``conditioning_embedding_channels``). ``forward`` returns
    (double-block residuals, single-block residuals), each a list of (B, N, D), for ``Flux.forward``."""

    def __init__(self, config: FluxConfig, num_mode: Optional[int] = None,
                 conditioning_embedding_channels: Optional[int] = None):
        super().__init__()
        self.config = c = config
        if c.condition_channels:
            raise UnsupportedConfigError("in_channels", c.in_channels, supported="the packed latents' channels alone",
                                         model=CLASS_NAME)
        if num_mode is not None and (isinstance(num_mode, bool) or not isinstance(num_mode, int) or num_mode < 1):
            raise UnsupportedConfigError("num_mode", num_mode, supported="None or a positive int", model=CLASS_NAME)
        self.num_mode = num_mode
        d = c.inner_dim
        self.time_text_embed = TimeGuidanceTextEmbedding(d, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = nn.Linear(c.joint_attention_dim, d)
        self.x_embedder = nn.Linear(c.in_channels, d)
        self.transformer_blocks = nn.ModuleList([FluxTransformerBlock(c) for _ in range(c.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([FluxSingleTransformerBlock(c)
                                                        for _ in range(c.num_single_layers)])
        self.controlnet_blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(c.num_layers))
        self.controlnet_single_blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(c.num_single_layers))
        if num_mode is not None:
            self.controlnet_mode_embedder = nn.Embedding(num_mode, d)
        self.controlnet_x_embedder = nn.Linear(c.in_channels, d)
        hint = conditioning_embedding_channels
        if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int) or hint * PACK * PACK
                                 != c.in_channels):
            raise UnsupportedConfigError("conditioning_embedding_channels", hint,
                                         supported=f"None, or {c.in_channels // (PACK * PACK)} (in_channels / 4: "
                                                   f"the hint is packed 2x2 like the latents)", model=CLASS_NAME)
        self.conditioning_embedding_channels = hint
        # (XLabs: the control image in pixels -> (B, K, H, W), 8x down)
        self.input_hint_block = None if hint is None else ConditioningEmbedding(3, HINT_CHANNELS, hint)

    @property
    def count(self) -> None:
        return None  # (one ControlNet: MultiFluxControlNet has a count)

    @property
    def own_config(self) -> dict:
        """Its constructor's arguments beyond the transformer config (what a save writes back)."""
        return {"num_mode": self.num_mode, "conditioning_embedding_channels": self.conditioning_embedding_channels}

    @property
    def reads_pixels(self) -> bool:
        """XLabs': the control image itself (in [-1, 1]) through the hint encoder, not its VAE latents; its outputs
        repeat over the transformer's double blocks."""
        return self.input_hint_block is not None

    @property
    def image_downscale(self) -> int:
        """Pixels per latent pixel of its hint encoder (XLabs')."""
        return 2 ** (len(HINT_CHANNELS) - 1)

    def forward(self, x, timestep, control_image, control_scale, control_mode=None, encoder_hidden_states=None,
                text_embeds=None, guidance=None) -> tuple[list, list]:
        """x (B, C, H, W) latents; control_image (B, C, H, W) its latents (XLabs': the image, (B, 3, 8H, 8W) in
        [-1, 1]); control_scale (B,) or a number; control_mode (B,) int64 (Union ControlNets) -> ([(B, N, D)] per
        double block, [(B, N, D)] per single block), weighted by the scale."""
        b, _, hgt, wid = x.shape
        if self.reads_pixels:
            f = self.image_downscale
            want = (b, 3, hgt * f, wid * f)
            if tuple(control_image.shape) != want:
                raise BadArgumentError(f"control_image: expected the control image {want} ({f} pixels per latent "
                                       f"pixel), found {tuple(control_image.shape)}")
            control_image = self.input_hint_block(control_image.to(x.dtype))  # (B, K, H, W)
        elif tuple(control_image.shape) != tuple(x.shape):
            raise BadArgumentError(f"control_image: expected the control image's latents {tuple(x.shape)}, found "
                                   f"{tuple(control_image.shape)}")
        if self.num_mode is not None and control_mode is None:
            raise BadArgumentError(f"control_mode: this Union ControlNet needs the control type (an int below "
                                   f"{self.num_mode}), found none")
        h = self.x_embedder(pack(x)) + self.controlnet_x_embedder(pack(control_image.to(x.dtype)))  # (B, N, D)
        temb_act, ctx = embed_conditioning(self, timestep, guidance, text_embeds, encoder_hidden_states, h)
        if self.num_mode is not None:  # the control type's embedding is one more text token, first
            mode = torch.as_tensor(control_mode, device=x.device).long().reshape(-1).expand(b)
            ctx = torch.cat([self.controlnet_mode_embedder(mode)[:, None].to(ctx.dtype), ctx], dim=1)  # (B, 1+L, D)
        rope = rotary_tables(position_ids(ctx.shape[1], hgt // PACK, wid // PACK, x.device), self.config.axes_dims_rope)
        double, single = [], []
        for block in self.transformer_blocks:
            ctx, h = block(h, ctx, temb_act, rope)
            double.append(h)
        for block in self.single_transformer_blocks:
            ctx, h = block(h, ctx, temb_act, rope)
            single.append(h)
        scale = torch.as_tensor(control_scale, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        return ([scaled(lin(s), scale) for lin, s in zip(self.controlnet_blocks, double)],
                [scaled(lin(s), scale) for lin, s in zip(self.controlnet_single_blocks, single)])


class MultiFluxControlNet(nn.Module):
    """Several FLUX.1 ControlNets, their outputs summed: diffusers' ``FluxMultiControlNetModel``. Inputs stacked on a
    second axis: control_image (B, K, C, H, W), control_scale (B, K), control_mode (B, K)."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        depths = {(n.config.num_layers, n.config.num_single_layers) for n in self.nets}
        if len(depths) > 1:  # (diffusers adds their outputs block by block)
            raise BadArgumentError(f"set_controlnet: expected FLUX.1 ControlNets of one depth (their outputs add up "
                                   f"block by block), found (double, single) blocks {sorted(depths)}")
        if len({n.reads_pixels for n in self.nets}) > 1:  # (diffusers reads the first one's kind for every image)
            raise BadArgumentError("set_controlnet: expected FLUX.1 ControlNets all of XLabs' kind (a pixel-space "
                                   "hint encoder) or none")
        self.config = self.nets[0].config

    @property
    def reads_pixels(self) -> bool:
        return self.nets[0].reads_pixels

    @property
    def image_downscale(self) -> int:
        return self.nets[0].image_downscale

    @property
    def count(self) -> int:
        return len(self.nets)

    def forward(self, x, timestep, control_image, control_scale, control_mode=None, **conditioning):
        if control_image.dim() != 5 or control_image.shape[1] != len(self.nets):
            raise BadArgumentError(f"control_image: expected (B, {len(self.nets)}, C, H, W), one per ControlNet, "
                                   f"found {tuple(control_image.shape)}")
        double, single = None, None
        for k, net in enumerate(self.nets):
            mode = None if control_mode is None else control_mode[:, k]
            d, s = net(x, timestep, control_image[:, k], control_scale[:, k], mode, **conditioning)
            double = d if double is None else [a + r for a, r in zip(double, d)]
            single = s if single is None else [a + r for a, r in zip(single, s)]
        return double, single


class ControlledFlux(nn.Module):
    """A FLUX.1 transformer and the ControlNet(s) driving it, as one network with the transformer's signature plus
    the control inputs (what a Pipeline's runner calls: captured graphs and compiled models take both)."""

    def __init__(self, flux: Flux, controlnet):
        super().__init__()
        self.flux, self.controlnet = flux, controlnet

    @property
    def config(self) -> FluxConfig:
        return self.flux.config

    def forward(self, x, timestep, class_labels=None, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                guidance=None, image_latents=None, control_image=None, control_scale=None, control_guess=None,
                control_mode=None, control_encoder_hidden_states=None, control_text_embeds=None):
        """control_encoder_hidden_states / control_text_embeds: the text the ControlNet reads, when not the
        transformer's (true CFG: diffusers runs the ControlNet once, on the conditional text, and gives both passes
        its outputs; fastdiff hands the unconditional pass the conditional text for the ControlNet)."""
        if control_image is None or control_scale is None:
            raise BadArgumentError("this FLUX.1 transformer is driven by a ControlNet: expected control_image and "
                                   "control_scale")
        double, single = self.controlnet(
            x, timestep, control_image, control_scale, control_mode,
            encoder_hidden_states=encoder_hidden_states if control_encoder_hidden_states is None
            else control_encoder_hidden_states,
            text_embeds=text_embeds if control_text_embeds is None else control_text_embeds, guidance=guidance)
        return self.flux(x, timestep, class_labels=class_labels, encoder_hidden_states=encoder_hidden_states,
                         text_embeds=text_embeds, time_ids=time_ids, guidance=guidance, image_latents=image_latents,
                         block_residuals=double, single_residuals=single,
                         residuals_repeat=self.controlnet.reads_pixels)


def check_fits(controlnet: FluxControlNet, flux: Flux) -> None:
    """Refuse a FLUX.1 ControlNet made for another transformer (its widths, text widths or latent channels)."""
    mine, theirs = controlnet.config, flux.config
    wrong = [f"{k}: {getattr(mine, k)!r} against the transformer's {getattr(theirs, k)!r}"
             for k in ("inner_dim", "attention_head_dim", "joint_attention_dim", "pooled_projection_dim",
                       "latent_channels", "axes_dims_rope") if getattr(mine, k) != getattr(theirs, k)]
    if theirs.condition_channels:  # (FLUX.1 Fill / Depth / Canny: diffusers drives neither with a ControlNet)
        wrong.append(f"the transformer reads {theirs.condition_channels} conditioning channels beside the latents "
                     f"(FLUX.1 Fill / Depth / Canny), which no FLUX.1 ControlNet pipeline drives")
    if mine.guidance_embeds and not theirs.guidance_embeds:  # (it would read a guidance the transformer has not)
        wrong.append("guidance_embeds: a guidance-distilled ControlNet for a transformer without a guidance input")
    if wrong:
        raise BadArgumentError("set_controlnet: this FLUX.1 ControlNet was made for another transformer; "
                               + "; ".join(wrong))


__all__ = ["FluxControlNet", "MultiFluxControlNet", "ControlledFlux", "check_fits", "CLASS_NAME"]
