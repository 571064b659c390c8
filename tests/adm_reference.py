"""A transcription of openai/guided-diffusion's networks (``guided_diffusion/unet.py`` at commit 22e0df8: the
noisy-image classifier ``EncoderUNetModel``, the ``UNetModel`` and its ``SuperResModel``, and the blocks they build),
the reference the ADM loaders, classifier guidance and super-resolution are tested against. Parameter names are the official ones, so its ``state_dict()`` is a checkpoint as
``classifier_train.py`` saves one. Written from the paper's code for testing only; fastdiff never imports it."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(ch):
    return GroupNorm32(32, ch)


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels=None, use_scale_shift_norm=False, down=False, up=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.down, self.up = down, up
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if use_scale_shift_norm else 1)
                                                             * self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if self.out_channels == channels else \
            nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.down or self.up:
            h = self.in_layers[:-1](x)
            resample = (lambda t: F.avg_pool2d(t, 2)) if self.down else \
                (lambda t: F.interpolate(t, scale_factor=2, mode="nearest"))
            h, x = resample(h), resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _legacy_attention(qkv, heads):
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def _new_attention(qkv, heads):
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", (q * scale).reshape(bs * heads, ch, length),
                          (k * scale).reshape(bs * heads, ch, length))
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v.reshape(bs * heads, ch, length)).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_head_channels, new_order=False, num_heads=None):
        super().__init__()
        self.heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.new_order = new_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = (_new_attention if self.new_order else _legacy_attention)(qkv, self.heads)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.heads = embed_dim // num_heads_channels

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None, :, :].to(x.dtype)
        x = _new_attention(self.qkv_proj(x), self.heads)
        return self.c_proj(x)[:, :, 0]


class Downsample(nn.Module):
    def __init__(self, channels, use_conv=True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels, use_conv=True):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Seq(nn.Sequential):  # TimestepEmbedSequential
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class EncoderUNetModel(nn.Module):
    """ADM's classifier (``resblock_updown=True``, as ``create_classifier`` builds every released one, or strided-conv
    downsampling)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult, num_head_channels=64, use_scale_shift_norm=True, use_new_attention_order=False,
                 pool="attention", resblock_updown=True):
        super().__init__()
        self.model_channels, self.pool = model_channels, pool
        ted = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([Seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
        feature_size, ds = ch, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, ted, int(mult * model_channels), use_scale_shift_norm)]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels, use_new_attention_order))
                self.input_blocks.append(Seq(*layers))
                feature_size += ch
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Seq(ResBlock(ch, ted, ch, use_scale_shift_norm, down=True)
                                             if resblock_updown else Downsample(ch)))
                ds *= 2
                feature_size += ch
        self.middle_block = Seq(ResBlock(ch, ted, ch, use_scale_shift_norm),
                                AttentionBlock(ch, num_head_channels, use_new_attention_order),
                                ResBlock(ch, ted, ch, use_scale_shift_norm))
        feature_size += ch
        if pool == "adaptive":
            self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     nn.Conv2d(ch, out_channels, 1), nn.Flatten())
        elif pool == "attention":
            self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                     AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:  # spatial_v2
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), normalization(2048), nn.SiLU(),
                                     nn.Linear(2048, out_channels))

    def forward(self, x, timesteps):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        results, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            if self.pool.startswith("spatial"):
                results.append(h.mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            results.append(h.mean(dim=(2, 3)))
            return self.out(torch.cat(results, dim=-1))
        return self.out(h)


class UNetModel(nn.Module):
    """ADM's UNet: ``resblock_updown=True`` (every released guided-diffusion model) or conv resampling (script_util's
    default, improved-diffusion's only way)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult, num_classes=None, num_heads=1, num_head_channels=-1, use_scale_shift_norm=True,
                 use_new_attention_order=False, resblock_updown=True, conv_resample=True):
        super().__init__()
        self.model_channels, self.num_classes = model_channels, num_classes
        ted = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, ted)
        attn = lambda c: AttentionBlock(c, num_head_channels, use_new_attention_order, num_heads)  # noqa: E731
        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([Seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, ted, int(mult * model_channels), use_scale_shift_norm)]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(Seq(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Seq(ResBlock(ch, ted, ch, use_scale_shift_norm, down=True)
                                             if resblock_updown else Downsample(ch, conv_resample)))
                chans.append(ch)
                ds *= 2
        self.middle_block = Seq(ResBlock(ch, ted, ch, use_scale_shift_norm), attn(ch),
                                ResBlock(ch, ted, ch, use_scale_shift_norm))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), ted, int(model_channels * mult), use_scale_shift_norm)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, ted, ch, use_scale_shift_norm, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(Seq(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, y=None):
        hs = []
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class SuperResModel(UNetModel):
    """ADM's upsampler: the UNet on [x, the low-resolution image upsampled bilinearly to x's size]."""

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, **kwargs)


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter redrawn (the fixtures' rule: N(0, 0.05), norms' weights 1 + N(0, 0.05)), so that no layer is
    the zero-initialised one of the official init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            is_norm_weight = name.endswith("weight") and p.dim() == 1 and "norm" in type(
                model.get_submodule(name.rsplit(".", 1)[0])).__name__.lower()
            p.copy_(1 + noise if is_norm_weight else noise)
    return model.eval()
