"""ControlNet (Zhang et al. 2023), as diffusers' ``ControlNetModel``, and a UNet driven by one.

A ControlNet is a copy of a UNet's embeddings, down path and middle block that also reads a conditioning image
(edges, depth, pose, ...). Its outputs, one per skip connection and one for the middle, pass through zero-initialised
1x1 convolutions and are added to the UNet's skips and middle. The weights keep diffusers' names, so a diffusers
``ControlNetModel`` folder loads as it is (``fastdiff.checkpoints.controlnet``).

Per sample, the network takes:

* ``control_image`` (B, 3, H * 8, W * 8), in [0, 1], as diffusers' control image processor leaves it;
* ``control_scale`` (B,): ``controlnet_conditioning_scale``. It is 0 where a sample's call falls outside its
  ``control_guidance_start`` / ``_end`` window: ``fastdiff.controlnet.ControlWindow`` sets it per call;
* ``control_guess`` (B,): 1 for diffusers' ``guess_mode``, whose residuals are weighted from 0.1 (the first
  skip) to 1 (the middle) on a log scale.

These are tensors, so captured graphs and compiled models take new values without a recapture.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadArgumentError, UnsupportedConfigError
from .unet import UNet, UNetConfig

# ControlNetModel's own config fields (the rest are UNet2DConditionModel's, with the same defaults)
CONTROLNET_FIELDS = dict(conditioning_channels=3, controlnet_conditioning_channel_order="rgb",
                         conditioning_embedding_out_channels=(16, 32, 96, 256), global_pool_conditions=False)


class ConditioningEmbedding(nn.Module):
    """The conditioning image (B, 3, 8H, 8W) -> (B, C0, H, W): diffusers' ``ControlNetConditioningEmbedding``. Each
    stage is a 3x3 convolution and a strided one (2x down), with SiLU between them all."""

    def __init__(self, in_channels: int, channels: tuple, out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(UNet):
    """diffusers' ``ControlNetModel``: a UNet's embeddings, down path and middle (its own weights), the conditioning
    embedding, and one zero convolution per output. ``forward`` returns (down residuals, mid residual) for
    ``UNet.forward(down_residuals=, mid_residual=)``."""

    def __init__(self, config: UNetConfig, conditioning_channels: int = 3,
                 conditioning_embedding_out_channels: tuple = (16, 32, 96, 256), global_pool_conditions: bool = False,
                 controlnet_conditioning_channel_order: str = "rgb"):
        super().__init__(config, up_path=False)
        if controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise UnsupportedConfigError("controlnet_conditioning_channel_order", controlnet_conditioning_channel_order,
                                         supported=["rgb", "bgr"], model="ControlNetModel")
        self.conditioning_channels = int(conditioning_channels)
        self.global_pool_conditions = bool(global_pool_conditions)
        self.bgr = controlnet_conditioning_channel_order == "bgr"
        ch = list(config.block_out_channels)
        self.controlnet_cond_embedding = ConditioningEmbedding(self.conditioning_channels,
                                                               tuple(conditioning_embedding_out_channels), ch[0])
        widths = [ch[0]]  # every skip's channels, in the UNet's order
        for i, block in enumerate(self.down_blocks):
            widths += [ch[i]] * len(block.resnets) + ([ch[i]] if block.downsamplers is not None else [])
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(w, w, 1) for w in widths)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    @classmethod
    def from_unet(cls, unet: UNet, conditioning_embedding_out_channels: tuple = (16, 32, 96, 256),
                  load_weights_from_unet: bool = True, **fields) -> "ControlNet":
        """A ControlNet for ``unet``, as diffusers' ``ControlNetModel.from_unet`` (how training starts one): the
        UNet's config, its embeddings', down path's and middle's weights copied, and the zero convolutions (the
        outputs and the conditioning embedding's last) at zero, so it changes nothing until trained. ``fields``:
        ``conditioning_channels``, ``controlnet_conditioning_channel_order``, ``global_pool_conditions``."""
        import dataclasses

        n = len(unet.config.block_out_channels)
        config = dataclasses.replace(unet.config, up_block_types=("UpBlock2D",) * n)
        p = next(unet.parameters())
        with torch.device(p.device):
            net = cls(config, conditioning_embedding_out_channels=conditioning_embedding_out_channels, **fields)
        net = net.to(p.dtype)
        with torch.no_grad():
            zero = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
            for conv in zero:
                conv.weight.zero_(), conv.bias.zero_()
            if load_weights_from_unet:
                mine, theirs = net.state_dict(), unet.state_dict()
                net.load_state_dict({k: theirs[k] for k in mine if k in theirs}, strict=False)
        return net.eval()

    @property
    def controlnet_config(self) -> dict:
        """The ControlNetModel fields beyond the UNet's (what a save writes back)."""
        return dict(conditioning_channels=self.conditioning_channels,
                    controlnet_conditioning_channel_order="bgr" if self.bgr else "rgb",
                    conditioning_embedding_out_channels=[m.out_channels for m in self._embedding_convs()],
                    global_pool_conditions=self.global_pool_conditions)

    @property
    def image_downscale(self) -> int:
        """Control image pixels per latent pixel (8 for SD's ControlNets: three strided convolutions)."""
        return 2 ** len(self.controlnet_cond_embedding.blocks[1::2])

    def _embedding_convs(self) -> list:
        e = self.controlnet_cond_embedding
        return [e.conv_in] + list(e.blocks)[1::2]

    def forward(self, x, timestep, control_image, control_scale, control_guess=None, class_labels=None,
                encoder_hidden_states=None, text_embeds=None, time_ids=None):
        """x (B, C, H, W) latents; control_image (B, 3, 8H, 8W) in [0, 1]; control_scale (B,) or a number;
        control_guess (B,): 1 where guess mode weights the outputs. -> ([skip residual (B, Ci, Hi, Wi)], mid
        residual (B, C_last, h, w))."""
        b = x.shape[0]
        if control_image.dim() != 4 or control_image.shape[0] != b or control_image.shape[1] != \
                self.conditioning_channels:
            raise BadArgumentError(f"control_image: expected ({b}, {self.conditioning_channels}, H, W), found "
                                   f"{tuple(control_image.shape)}")
        _, emb, ctx = self._conditioning(x, timestep, class_labels, encoder_hidden_states, text_embeds, time_ids)
        image = control_image.to(x.dtype)
        if self.bgr:
            image = image.flip(1)
        cond = self.controlnet_cond_embedding(image)  # (B, C0, H, W)
        if cond.shape[2:] != x.shape[2:]:
            f = self.image_downscale
            raise BadArgumentError(f"control_image: expected {x.shape[2] * f}x{x.shape[3] * f} pixels for "
                                   f"{x.shape[2]}x{x.shape[3]} latents, found "
                                   f"{control_image.shape[2]}x{control_image.shape[3]}")
        h, skips = self._down_and_middle(self.conv_in(x) + cond, emb, ctx)
        outputs = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)] + [self.controlnet_mid_block(h)]
        weights = self._weights(control_scale, control_guess, len(outputs), b, x)  # (len(outputs), B)
        outputs = [scaled(o, w) for o, w in zip(outputs, weights)]
        if self.global_pool_conditions:
            outputs = [o.mean(dim=(2, 3), keepdim=True) for o in outputs]
        return outputs[:-1], outputs[-1]

    def _weights(self, scale, guess: Optional[torch.Tensor], n: int, b: int, x: torch.Tensor) -> torch.Tensor:
        """Each output's weight per sample: the scale, times (guess mode, without global pooling) diffusers' log
        ramp from 0.1 to 1 over the outputs."""
        scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1).expand(b)  # (B,)
        w = scale[None, :].expand(n, b)  # (n, B)
        if guess is not None and not self.global_pool_conditions:
            ramp = torch.logspace(-1, 0, n, device=x.device)[:, None]  # (n, 1)
            g = guess.to(device=x.device, dtype=torch.float32).reshape(1, -1)
            w = w * (g * ramp + (1 - g))
        return w  # (n, B) float32


def scaled(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t (B, ...) times the per-sample scale (B,) float32, in float32 and rounded once to t's dtype: what diffusers'
    ``sample * conditioning_scale`` (a Python float) computes in half precision. Every ControlNet weights its
    outputs so."""
    return (t.float() * scale.reshape(-1, *[1] * (t.dim() - 1))).to(t.dtype)


class MultiControlNet(nn.Module):
    """Several ControlNets driving one UNet, their outputs summed: diffusers' ``MultiControlNetModel``. Each takes
    its own image, scale and step window; the inputs stack them on a second axis: control_image (B, K, C, H, W),
    control_scale (B, K); control_guess (B,) is shared."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        for name in ("conditioning_channels", "image_downscale"):
            values = {getattr(net, name) for net in self.nets}
            if len(values) > 1:
                raise BadArgumentError(f"set_controlnet: expected ControlNets of one {name} (their images stack), "
                                       f"found {sorted(values)}")
        self.conditioning_channels = self.nets[0].conditioning_channels
        self.image_downscale = self.nets[0].image_downscale

    def forward(self, x, timestep, control_image, control_scale, control_guess=None, **conditioning):
        """x (B, C, H, W); control_image (B, K, C', fH, fW); control_scale (B, K) -> the summed residuals."""
        if control_image.dim() != 5 or control_image.shape[1] != len(self.nets):
            raise BadArgumentError(f"control_image: expected (B, {len(self.nets)}, C, H, W), one image per ControlNet, "
                                   f"found {tuple(control_image.shape)}")
        down, mid = None, None
        for k, net in enumerate(self.nets):
            d, m = net(x, timestep, control_image[:, k], control_scale[:, k], control_guess, **conditioning)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return down, mid


class ControlledUNet(nn.Module):
    """A UNet and the ControlNet that drives it, as one network with the UNet's signature plus the control inputs
    (what a Pipeline's runner calls once a ControlNet is set: captured graphs and compiled models take both)."""

    def __init__(self, unet: UNet, controlnet):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet  # a ControlNet or a MultiControlNet

    @property
    def config(self) -> UNetConfig:
        """The UNet's (what exporters and runners read of the network)."""
        return self.unet.config

    def forward(self, x, timestep, class_labels=None, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                image_latents=None, control_image=None, control_scale=None, control_guess=None, image_embeds=None,
                image_masks=None):
        if control_image is None or control_scale is None:
            raise BadArgumentError("this network is driven by a ControlNet: expected control_image and "
                                   "control_scale, found " + ("neither" if control_image is None and control_scale
                                                              is None else "one of them"))
        # (an inpainting UNet's ControlNet reads the latents alone, as diffusers' ControlNet inpainting pipeline)
        down, mid = self.controlnet(x, timestep, control_image, control_scale, control_guess,
                                    class_labels=class_labels, encoder_hidden_states=encoder_hidden_states,
                                    text_embeds=text_embeds, time_ids=time_ids)
        # (an IP-Adapter's image prompt reaches the UNet alone, as diffusers' ControlNet pipelines hand it)
        return self.unet(x, timestep, class_labels=class_labels, encoder_hidden_states=encoder_hidden_states,
                         text_embeds=text_embeds, time_ids=time_ids, image_latents=image_latents,
                         down_residuals=down, mid_residual=mid, image_embeds=image_embeds, image_masks=image_masks)


def check_fits(controlnet: ControlNet, unet: UNet) -> None:
    """Refuse a ControlNet whose outputs do not match the UNet's skips (another base model's)."""
    def listed(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    mine, theirs = controlnet.config, unet.config
    fields = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type")
    wrong = [f"{k}: {getattr(mine, k)!r} against the UNet's {getattr(theirs, k)!r}" for k in fields
             if listed(getattr(mine, k)) != listed(getattr(theirs, k))]
    if mine.in_channels not in (theirs.in_channels, theirs.out_channels):  # (an inpainting UNet's: its latents')
        wrong.insert(0, f"in_channels: {mine.in_channels} against the UNet's {theirs.out_channels} latent channels")
    if wrong:
        raise BadArgumentError("set_controlnet: this ControlNet was made for another UNet; " + "; ".join(wrong))


def controlnet_family(model: nn.Module) -> Optional[tuple]:
    """(the ControlNet class that drives ``model``, the class that sums several, their fit check), or None for a
    network no ControlNet drives: a text UNet's ``ControlNet``, SD3's ``SD3ControlNet``, FLUX.1's
    ``FluxControlNet``."""
    from . import flux_controlnet, sd3_controlnet
    from .flux import Flux
    from .mmdit import MMDiT

    if isinstance(model, Flux):
        return flux_controlnet.FluxControlNet, flux_controlnet.MultiFluxControlNet, flux_controlnet.check_fits
    if isinstance(model, MMDiT):
        return sd3_controlnet.SD3ControlNet, sd3_controlnet.MultiSD3ControlNet, sd3_controlnet.check_fits
    if isinstance(model, UNet) and model.config.conditional:
        return ControlNet, MultiControlNet, check_fits
    return None


def controlled(model: nn.Module, controlnet: nn.Module) -> nn.Module:
    """``model`` driven by ``controlnet`` as one network: a ``ControlledUNet``, an SD3 transformer's
    ``ControlledMMDiT`` or a FLUX.1 transformer's ``ControlledFlux``."""
    from .flux import Flux
    from .mmdit import MMDiT

    if isinstance(model, Flux):
        from .flux_controlnet import ControlledFlux

        return ControlledFlux(model, controlnet)
    if isinstance(model, MMDiT):
        from .sd3_controlnet import ControlledMMDiT

        return ControlledMMDiT(model, controlnet)
    return ControlledUNet(model, controlnet)


__all__ = ["ControlNet", "MultiControlNet", "ControlledUNet", "ConditioningEmbedding", "CONTROLNET_FIELDS",
           "check_fits", "controlnet_family", "controlled", "scaled"]
