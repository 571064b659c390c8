"""SD3 ControlNets (InstantX's and SD3.5's layouts), as diffusers' ``SD3ControlNetModel``, and an SD3 transformer
driven by them.

An SD3 ControlNet is a shorter copy of the MMDiT (its own patch embedding with the position table, time / pooled
text embedding, text projection and joint blocks, every block updating both streams) whose image tokens also read
the control image's VAE latents through a zero-initialised patch embedding without positions
(``pos_embed_input``). Each block's image tokens pass through a zero-initialised linear layer
(``controlnet_blocks``), are weighted by ``controlnet_conditioning_scale``, and are added to the transformer's image
tokens after its blocks (``MMDiT.forward(block_residuals=)``). InstantX's ControlNets read zeros for the pooled text
embedding (``force_zeros_for_pooled_projection``) and latents encoded without the VAE's shift. Parameter names are
diffusers', so an ``SD3ControlNetModel`` folder loads as it is (``fastdiff.checkpoints.controlnet``).

Per sample the network takes ``control_image`` (B, C, H, W), the control image's latents, and ``control_scale``
(B,) (0 outside the sample's step window: ``fastdiff.controlnet.ControlWindow``). Several ControlNets
(``SD3MultiControlNetModel``) take them stacked on a second axis, and their outputs add up.

SD3.5's official ControlNets (``use_pos_embed=False``, ``joint_attention_dim=None``) have image-only blocks (no text
stream: diffusers' ``SD3SingleTransformerBlock``) and no position table of their own: they share the transformer's
patch embedding, which ``set_controlnet`` copies in (``share_positions``), as diffusers' pipeline does.

The inpainting ControlNet (``extra_conditioning_channels``, Alimama's layout, as diffusers'
``StableDiffusion3ControlNetInpaintingPipeline`` drives it) reads, instead of an image's latents, those of the
image with its masked pixels set to black (-1), followed by the inverted mask at the latent size: C + 1 channels.
That pipeline hands it zeros for the pooled text embedding and latents with the VAE's shift, whatever its config
says.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadArgumentError, UnsupportedConfigError
from .controlnet import scaled
from .layers import ModulatedLayerNorm
from .mmdit import (AdaNormZero, FeedForward, JointAttention, JointTransformerBlock, MMDiT, MMDiTConfig, PatchEmbed,
                    TimeTextEmbedding)

CLASS_NAME = "SD3ControlNetModel"
# SD3ControlNetModel's own config fields (the rest are SD3Transformer2DModel's) and the values implemented
OWN_FIELDS = dict(extra_conditioning_channels=0, pos_embed_type="sincos", use_pos_embed=True,
                  force_zeros_for_pooled_projection=True)


class ImageOnlyBlock(nn.Module):
    """diffusers' ``SD3SingleTransformerBlock``: adaLN-Zero, self-attention over the image tokens, a feed-forward."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        dim = config.inner_dim
        self.norm1 = AdaNormZero(dim, 6)
        self.attn = JointAttention(dim, config.num_attention_heads, config.attention_head_dim, None, joint=False)
        self.norm2 = ModulatedLayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim)

    def forward(self, x, temb_act):
        h, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb_act)
        x = x + gate[:, None] * self.attn(h)  # (B, N, D)
        return x + gate_mlp[:, None] * self.ff(self.norm2(x, shift_mlp, scale_mlp))


class ControlPatchEmbed(nn.Module):
    """The control latents (B, C, H, W) -> (B, H/p * W/p, D): a patch convolution, no positions."""

    def __init__(self, config: MMDiTConfig, extra_channels: int = 0):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels + extra_channels, config.inner_dim, config.patch_size,
                              stride=config.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class SD3ControlNet(nn.Module):
    """diffusers' ``SD3ControlNetModel`` (InstantX's layout, or SD3.5's: ``image_only``). ``forward`` returns one
    (B, N, D) residual per block."""

    def __init__(self, config: MMDiTConfig, force_zeros_for_pooled_projection: bool = True, image_only: bool = False,
                 extra_conditioning_channels: int = 0):
        super().__init__()
        self.config = c = config
        self.force_zeros_for_pooled_projection = bool(force_zeros_for_pooled_projection)
        # the inpainting ControlNet's mask channel(s) after the masked image's latents
        self.extra_conditioning_channels = int(extra_conditioning_channels)
        self.image_only = bool(image_only)  # SD3.5's official layout: no text, the transformer's positions
        d = c.inner_dim
        self.pos_embed = None if image_only else PatchEmbed(c)
        self.time_text_embed = TimeTextEmbedding(d, c.pooled_projection_dim)
        if image_only:
            self.context_embedder = None
            self.transformer_blocks = nn.ModuleList([ImageOnlyBlock(c) for _ in range(c.num_layers)])
        else:
            self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
            self.transformer_blocks = nn.ModuleList([JointTransformerBlock(c, i, context_pre_only=False)
                                                     for i in range(c.num_layers)])
        self.controlnet_blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(c.num_layers))
        self.pos_embed_input = ControlPatchEmbed(c, self.extra_conditioning_channels)

    @property
    def count(self) -> None:
        return None  # (one ControlNet: MultiSD3ControlNet has a count)

    @property
    def own_config(self) -> dict:
        """Its constructor's arguments beyond the transformer config (what a save writes back)."""
        return {"force_zeros_for_pooled_projection": self.force_zeros_for_pooled_projection,
                "image_only": self.image_only, "extra_conditioning_channels": self.extra_conditioning_channels}

    def share_positions(self, mmdit: MMDiT) -> None:
        """An image-only ControlNet takes a copy of the transformer's patch embedding (diffusers' pipeline sets
        ``controlnet.pos_embed`` from the transformer's); the others keep their own."""
        if self.image_only:
            self.pos_embed = copy.deepcopy(mmdit.pos_embed)

    @property
    def inpaints(self) -> bool:
        """Whether it is an inpainting ControlNet (a masked image and its mask: ``extra_conditioning_channels``)."""
        return self.extra_conditioning_channels > 0

    @property
    def vae_shift(self) -> bool:
        """Whether its control latents carry the VAE's shift (InstantX's were trained without it; the inpainting
        pipeline shifts them whatever the config says)."""
        return self.inpaints or not self.force_zeros_for_pooled_projection

    @property
    def zero_pooled(self) -> bool:
        """Whether it reads zeros for the pooled text embedding (InstantX's; the inpainting pipeline's always)."""
        return self.inpaints or self.force_zeros_for_pooled_projection

    def forward(self, x, timestep, control_image, control_scale, encoder_hidden_states=None,
                text_embeds=None) -> list:
        """x (B, C, H, W) latents; control_image (B, C, H, W) its latents (an inpainting ControlNet's: the masked
        image's, then the inverted mask: (B, C + extra, H, W)); control_scale (B,) or a number -> [(B, N, D)] per
        block, weighted by the scale."""
        b = x.shape[0]
        want = (b, x.shape[1] + self.extra_conditioning_channels, *x.shape[2:])
        if tuple(control_image.shape) != want:
            raise BadArgumentError(f"control_image: expected the control image's latents {want}, found "
                                   f"{tuple(control_image.shape)}")
        if self.pos_embed is None:
            raise BadArgumentError("this SD3.5 ControlNet shares its transformer's patch embedding: attach it with "
                                   "pipe.set_controlnet first")
        t = timestep if torch.is_tensor(timestep) else torch.tensor([float(timestep)], device=x.device)
        t = t.to(x.device).reshape(-1).expand(b)  # (B,)
        h = self.pos_embed(x)  # (B, N, D)
        pooled = text_embeds.to(h.dtype)
        if self.zero_pooled:  # (diffusers' pipelines hand it zeros)
            pooled = torch.zeros_like(pooled)
        temb_act = F.silu(self.time_text_embed(t, pooled))  # (B, D)
        ctx = None if self.image_only else self.context_embedder(encoder_hidden_states.to(h.dtype))  # (B, L, D)
        h = h + self.pos_embed_input(control_image.to(h.dtype))
        outputs = []
        for block in self.transformer_blocks:
            if self.image_only:
                h = block(h, temb_act)
            else:
                h, ctx = block(h, ctx, temb_act)
            outputs.append(h)
        scale = torch.as_tensor(control_scale, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        return [scaled(lin(o), scale) for lin, o in zip(self.controlnet_blocks, outputs)]


class MultiSD3ControlNet(nn.Module):
    """Several SD3 ControlNets, their outputs summed (diffusers' ``SD3MultiControlNetModel``): control_image
    (B, K, C, H, W), control_scale (B, K)."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        if len({n.config.num_layers for n in self.nets}) > 1:
            raise BadArgumentError(f"set_controlnet: expected SD3 ControlNets of one depth (their outputs add up "
                                   f"block by block), found {[n.config.num_layers for n in self.nets]} blocks")
        if len({n.extra_conditioning_channels for n in self.nets}) > 1:
            raise BadArgumentError("set_controlnet: expected SD3 ControlNets that all inpaint (a masked image and its "
                                   "mask) or none, found "
                                   f"{[n.extra_conditioning_channels for n in self.nets]} extra channels")
        if len({n.vae_shift for n in self.nets}) > 1:
            raise BadArgumentError("set_controlnet: expected SD3 ControlNets that all read their control latents "
                                   "with the VAE's shift, or all without (force_zeros_for_pooled_projection)")
        self.config = self.nets[0].config

    @property
    def count(self) -> int:
        return len(self.nets)

    @property
    def vae_shift(self) -> bool:
        return self.nets[0].vae_shift  # (diffusers' pipeline reads the first one's config)

    @property
    def inpaints(self) -> bool:
        return self.nets[0].inpaints

    @property
    def extra_conditioning_channels(self) -> int:
        return self.nets[0].extra_conditioning_channels

    def forward(self, x, timestep, control_image, control_scale, **conditioning):
        if control_image.dim() != 5 or control_image.shape[1] != len(self.nets):
            raise BadArgumentError(f"control_image: expected (B, {len(self.nets)}, C, H, W), one per ControlNet, "
                                   f"found {tuple(control_image.shape)}")
        total = None
        for k, net in enumerate(self.nets):
            out = net(x, timestep, control_image[:, k], control_scale[:, k], **conditioning)
            total = out if total is None else [a + r for a, r in zip(total, out)]
        return total


class ControlledMMDiT(nn.Module):
    """An SD3 transformer and the ControlNet(s) driving it, as one network with the transformer's signature plus the
    control inputs (what a Pipeline's runner calls)."""

    def __init__(self, mmdit: MMDiT, controlnet):
        super().__init__()
        self.mmdit, self.controlnet = mmdit, controlnet

    @property
    def config(self) -> MMDiTConfig:
        return self.mmdit.config

    def forward(self, x, timestep, class_labels=None, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                control_image=None, control_scale=None, control_guess=None):
        if control_image is None or control_scale is None:
            raise BadArgumentError("this SD3 transformer is driven by a ControlNet: expected control_image and "
                                   "control_scale")
        residuals = self.controlnet(x, timestep, control_image, control_scale,
                                    encoder_hidden_states=encoder_hidden_states, text_embeds=text_embeds)
        return self.mmdit(x, timestep, class_labels=class_labels, encoder_hidden_states=encoder_hidden_states,
                          text_embeds=text_embeds, time_ids=time_ids, block_residuals=residuals)


def split_config(config: dict) -> tuple[MMDiTConfig, dict]:
    """(the transformer part's config, SD3ControlNet's own arguments) of an SD3ControlNetModel config.json dict;
    the layouts not implemented are refused by name."""
    config = dict(config)
    own = {k: config.pop(k, v) for k, v in OWN_FIELDS.items()}
    extra = own["extra_conditioning_channels"]
    if extra not in (0, 1) or isinstance(extra, bool):  # (the inpainting pipeline adds one mask channel)
        raise UnsupportedConfigError("extra_conditioning_channels", extra, supported="0, or 1 (the inpainting "
                                     "ControlNet's mask)", model=CLASS_NAME)
    # InstantX's layout (its own positions, joint blocks) or SD3.5's official one (neither)
    image_only = own["use_pos_embed"] is False and config.get("joint_attention_dim", 4096) is None
    if not image_only and (own["use_pos_embed"] is not True or config.get("joint_attention_dim", 4096) is None
                           or own["pos_embed_type"] != "sincos"):
        raise UnsupportedConfigError(
            "use_pos_embed / joint_attention_dim / pos_embed_type",
            (own["use_pos_embed"], config.get("joint_attention_dim"), own["pos_embed_type"]),
            supported="(True, an int, 'sincos'): InstantX's layout; (False, None, any): SD3.5's", model=CLASS_NAME)
    if image_only and extra:  # (diffusers' inpainting pipeline cannot run it: its blocks need positions)
        raise UnsupportedConfigError("extra_conditioning_channels", extra, supported="0 in SD3.5's image-only "
                                     "layout (the inpainting ControlNet is InstantX's layout)", model=CLASS_NAME)
    if image_only:  # (fields its layout leaves empty or unread: placeholders its modules never read; SD3.5 Large's
        # ControlNets keep caption_projection_dim 2048 beside a 2432 width)
        config["joint_attention_dim"] = 1
        config["caption_projection_dim"] = config.get("num_attention_heads", 18) * config.get("attention_head_dim",
                                                                                                64)
        config["pos_embed_max_size"] = config.get("pos_embed_max_size") or 96
        config["sample_size"] = min(config.get("sample_size", 128),
                                    config["pos_embed_max_size"] * config.get("patch_size", 2))
    config["_class_name"] = "SD3Transformer2DModel"
    # (copied from its transformer's, the dual-attention blocks may lie past its own depth: diffusers ignores those)
    depth = config.get("num_layers", 18)
    config["dual_attention_layers"] = [i for i in config.get("dual_attention_layers", ()) if i < depth]
    return MMDiTConfig.from_diffusers(config), dict(
        force_zeros_for_pooled_projection=bool(own["force_zeros_for_pooled_projection"]), image_only=image_only,
        extra_conditioning_channels=extra)


def check_fits(controlnet: SD3ControlNet, mmdit: MMDiT) -> None:
    """Refuse an SD3 ControlNet made for another transformer."""
    mine, theirs = controlnet.config, mmdit.config
    fields = ("inner_dim", "patch_size", "in_channels", "pooled_projection_dim") + (
        () if controlnet.image_only else ("joint_attention_dim",))
    wrong = [f"{k}: {getattr(mine, k)!r} against the transformer's {getattr(theirs, k)!r}" for k in fields
             if getattr(mine, k) != getattr(theirs, k)]
    if wrong:
        raise BadArgumentError("set_controlnet: this SD3 ControlNet was made for another transformer; "
                               + "; ".join(wrong))


__all__ = ["SD3ControlNet", "MultiSD3ControlNet", "ControlledMMDiT", "ImageOnlyBlock", "split_config", "check_fits",
           "CLASS_NAME"]
