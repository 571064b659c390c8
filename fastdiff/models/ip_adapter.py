"""IP-Adapter (Ye et al. 2023) on a text UNet, as diffusers' ``load_ip_adapter`` runs it.

An image prompt joins the text prompt through decoupled cross-attention: a CLIP vision embedding (B, D) is projected
to a few tokens (``ImageProjection``: Linear to tokens x width, then LayerNorm), and every cross-attention adds
``scale * attention(q, to_k_ip(tokens), to_v_ip(tokens))`` to its text attention before its output projection
(diffusers' ``IPAdapterAttnProcessor2_0``). The UNet takes the embedding as ``image_embeds=`` and projects it itself,
as diffusers' ``encoder_hid_proj`` does; the tokens travel to the attention layers beside the text states
(``ImageTokens``).

Weights: the original file layout (``{"image_proj": {proj.*, norm.*}, "ip_adapter": {"1.to_k_ip.weight", ...}}``, or a
safetensors file with those prefixes). Its cross-attention layers are numbered 1, 3, 5, ... in diffusers'
``attn_processors`` order: the down blocks', then the up blocks', then the middle block's. The base adapter (a
linear image projection, 4 tokens: ip-adapter_sd15, ip-adapter_sdxl, ...), IP-Adapter Plus (a resampler over the
encoder's hidden states: ``fastdiff.models.ip_resampler``), IP-Adapter Full Face (an MLP over every hidden state),
IP-Adapter Face ID (``fastdiff.models.ip_faceid``: a face embedding's MLP, and a LoRA) and Face ID Plus / Plus v2
(``fastdiff.models.ip_faceid_plus``: a perceiver over the face crop's hidden states with the face embedding's tokens
as queries, and the same LoRA) are read.

The scale is a buffer in every layer: ``set_scale`` changes it in place (one number, or InstantStyle's per-block
dict: ``fastdiff.models.ip_adapter_scales``), so captured graphs and compiled models take a new scale with nothing
recaptured.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..errors import BadArgumentError, CheckpointError, StateDictMismatchError


class ImageTokens:
    """The cross-attention context with the image prompt's tokens beside the text states (a tensor, or the UNet's
    ``Projected`` text states): ``tokens`` a tuple of (B, N * T, D) tensors, one per loaded adapter; ``masks`` a tuple
    of the same length, each None or the adapter's (B, N, H, W) masks (``fastdiff.ip_adapter_masks``)."""

    __slots__ = ("states", "tokens", "masks")

    def __init__(self, states, tokens: tuple, masks: Optional[tuple] = None):
        self.states, self.tokens = states, tokens
        self.masks = (None,) * len(tokens) if masks is None else masks


def add_image_attention(layer, o: torch.Tensor, q: torch.Tensor, image: "ImageTokens") -> torch.Tensor:
    """``o`` (B, Q, inner), the layer's text attention, plus each adapter's scaled attention to its image tokens
    (diffusers' ``IPAdapterAttnProcessor2_0``): one attention over all the adapter's tokens, or with masks one per
    image, each weighted by its mask downsampled to the layer's Q queries."""
    b = q.shape[0]
    for branch, tokens, masks in zip(layer.ip, image.tokens, image.masks):
        if masks is None:
            o = o + branch.scale * layer._attend(b, q, layer._heads(branch.to_k_ip(tokens)),
                                                 layer._heads(branch.to_v_ip(tokens)))
            continue
        per_image = tokens.reshape(b, masks.shape[1], -1, tokens.shape[-1])  # (B, N, T, D)
        for i in range(masks.shape[1]):
            a = layer._attend(b, q, layer._heads(branch.to_k_ip(per_image[:, i])),
                              layer._heads(branch.to_v_ip(per_image[:, i])))  # (B, Q, inner)
            o = o + branch.scale * (a * queries_mask(masks[:, i:i + 1], a.shape[1]).to(a.dtype))
    return o


def mask_cells(height: int, width: int, queries: int) -> tuple:
    """(rows, cols) of the cells an (height, width) mask is downsampled to for a layer of ``queries`` queries
    (diffusers' rule: rows from the aspect ratio, one more where they do not divide the queries); rows * cols may
    miss ``queries`` when the mask's aspect ratio is not the layer's."""
    import math

    rows = max(1, int(math.sqrt(queries / (width / height))))
    rows += int(queries % rows != 0)
    return rows, queries // rows


def attention_sizes(unet, height: int, width: int) -> list:
    """The (rows, cols) of the latent grid at every level of ``unet`` that holds attention layers, for latents of
    ``height`` x ``width`` (``fastdiff.models.unet.level_sizes``)."""
    from .unet import level_sizes

    blocks = list(unet.down_blocks) + [unet.mid_block]
    return [size for block, size in zip(blocks, level_sizes(unet, height, width))
            if getattr(block, "attentions", None) is not None]


def queries_mask(mask: torch.Tensor, queries: int) -> torch.Tensor:
    """(B, 1, H, W) mask -> (B, Q, 1) weights of a layer's Q queries, as diffusers'
    ``IPAdapterMaskProcessor.downsample``: bicubic to the mask's aspect ratio at about Q cells, the cells' count padded
    with zeros or cut to Q where the aspect ratios differ."""
    rows, cols = mask_cells(mask.shape[-2], mask.shape[-1], queries)
    m = torch.nn.functional.interpolate(mask, size=(rows, cols), mode="bicubic").flatten(1)  # (B, rows * cols)
    if m.shape[1] < queries:
        m = torch.nn.functional.pad(m, (0, queries - m.shape[1]))
    return m[:, :queries, None]


class ImageProjection(nn.Module):
    """diffusers ``ImageProjection``: (B, D) CLIP image embeddings -> (B, T, width) tokens."""

    def __init__(self, embed_dim: int, width: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, width * tokens)
        self.norm = nn.LayerNorm(width)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        b = embeds.shape[0]
        return self.norm(self.proj(embeds.reshape(b, -1)).reshape(b, self.tokens, -1))  # (B, T, width)


class FullImageProjection(nn.Module):
    """diffusers ``IPAdapterFullImageProjection`` (IP-Adapter Full Face, ip-adapter-full-face_sd15): every one of the
    encoder's (B, S, E) penultimate hidden states through Linear, GELU, Linear and LayerNorm -> (B, S, width) tokens.
    Weights ``proj.0`` / ``proj.2`` / ``proj.3`` (the LayerNorm), as the released file names them."""

    FILE_KEYS = frozenset(f"proj.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias"))

    def __init__(self, embed_dim: int, width: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, width),
                                  nn.LayerNorm(width))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.proj(states)  # (B, S, width)


class IPAttention(nn.Module):
    """A cross-attention's image branch: to_k_ip / to_v_ip (no bias) and the adapter's scale."""

    def __init__(self, context_dim: int, inner: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.register_buffer("scale", torch.ones(()), persistent=False)


def named_cross_attentions(unet) -> list:
    """(name, layer) of the UNet's cross-attention layers in diffusers' ``attn_processors`` order (down, up, then
    middle blocks), named as diffusers names them ("down_blocks.1.attentions.0.transformer_blocks.0.attn2"): every
    transformer's second attention (an ``only_cross_attention`` first one reads the text too, but diffusers gives it
    no image branch)."""
    from .unet import TransformerBlock

    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    blocks += [("mid_block", unet.mid_block)] if unet.mid_block is not None else []
    layers = []
    for base, block in blocks:
        layers.extend((f"{base}.{name}.attn2", m.attn2) for name, m in block.named_modules()
                      if isinstance(m, TransformerBlock))
    return layers


def cross_attentions(unet) -> list:
    """The UNet's cross-attention layers (``named_cross_attentions``' order)."""
    return [m for _, m in named_cross_attentions(unet)]


def split_state_dict(state: dict) -> dict:
    """{"image_proj": {...}, "ip_adapter": {...}} from the nested layout or a flat one with those prefixes."""
    if "image_proj" in state and "ip_adapter" in state and all(isinstance(state[k], dict) for k in
                                                               ("image_proj", "ip_adapter")):
        return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}
    out = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part in out and rest:
            out[part][rest] = value
    if not out["image_proj"] or not out["ip_adapter"]:
        raise CheckpointError(f"IP-Adapter: expected image_proj.* and ip_adapter.* weights, found keys "
                              f"{sorted(state)[:6]}")
    return out


def build_projection(proj: dict) -> nn.Module:
    """The image projection of an adapter's ``image_proj`` weights (the base adapter's, or Plus's resampler); a
    malformed file is one clear line (CheckpointError)."""
    from .ip_faceid import FaceIDProjection, is_faceid
    from .ip_faceid_plus import FaceIDPlusProjection, is_faceid_plus
    from .ip_resampler import Resampler, is_plus

    full = set(proj) == FullImageProjection.FILE_KEYS
    known = is_plus(proj) or full or is_faceid(proj) or is_faceid_plus(proj)
    if not known and set(proj) != {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        raise BadArgumentError(f"load_ip_adapter(): an IP-Adapter of another kind (image_proj keys "
                               f"{sorted(proj)[:4]}); fastdiff reads the base IP-Adapter (a linear image projection), "
                               f"IP-Adapter Plus (a resampler), IP-Adapter Full Face (an MLP over the hidden states), "
                               f"IP-Adapter Face ID and Face ID Plus (perceiver_resampler.* keys)")
    try:
        if is_plus(proj):
            return Resampler.from_state_dict(proj)
        if is_faceid(proj):
            return FaceIDProjection.from_state_dict(proj)
        if is_faceid_plus(proj):
            return FaceIDPlusProjection.from_state_dict(proj)
        if full:
            projection = FullImageProjection(proj["proj.0.weight"].shape[1], proj["proj.3.weight"].shape[0])
            projection.load_state_dict(proj)
            return projection
        width = proj["norm.weight"].shape[0]
        rows, embed = proj["proj.weight"].shape
        if rows % width:
            raise ValueError(f"proj.weight's {rows} rows are no whole number of {width}-wide tokens")
        projection = ImageProjection(embed, width, rows // width)
        projection.load_state_dict(proj)
        return projection
    except (KeyError, IndexError, ValueError, RuntimeError) as e:  # (a missing key, a tensor of another rank / size)
        detail = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise CheckpointError(f"IP-Adapter: malformed image_proj weights ({type(e).__name__}: {detail})") from e


def projection_sizes(projection: nn.Module) -> tuple:
    """(the width of the image features it reads, the width of the tokens it makes)."""
    if isinstance(projection, ImageProjection):
        return projection.proj.in_features, projection.norm.normalized_shape[0]
    if isinstance(projection, FullImageProjection):
        return projection.proj[0].in_features, projection.proj[2].out_features
    from .ip_faceid import FaceIDProjection

    if isinstance(projection, FaceIDProjection):
        return projection.in_features, projection.width
    return projection.in_features, projection.proj_out.out_features  # (Plus; Face ID Plus: its face embedding)


def check(unet, state: dict) -> nn.Module:
    """Refuse an adapter of ``state`` (``split_state_dict``'s layout) that does not fit ``unet`` (another kind of
    adapter, another base model's, malformed weights); returns its image projection, built."""
    projection = build_projection(state["image_proj"])
    width = projection_sizes(projection)[1]
    layers = cross_attentions(unet)
    context_dims = {m.to_k.in_features for m in layers}
    if context_dims != {width}:
        raise CheckpointError(f"IP-Adapter: image tokens {width} wide, and this UNet's cross-attention reads "
                              f"{sorted(context_dims)}-wide text states (another base model's adapter)")
    from .ip_faceid import is_lora_key, lora_pairs

    wanted = {f"{2 * i + 1}.to_{kv}_ip.weight": (m.heads * m.head_dim, width)
              for i, m in enumerate(layers) for kv in "kv"}
    lora_pairs(unet, state["ip_adapter"])  # (Face ID's LoRA, checked here: merged by the pipeline)
    given = {k: v for k, v in state["ip_adapter"].items() if not is_lora_key(k)}
    missing, unexpected = sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted))
    wrong = sorted(k for k in set(wanted) & set(given) if tuple(getattr(given[k], "shape", ())) != wanted[k])
    if missing or unexpected or wrong:  # (another base model's adapter: other layers or widths)
        raise StateDictMismatchError(missing, unexpected,
                                     [(k, wanted[k], tuple(getattr(given[k], "shape", ()))) for k in wrong],
                                     model=f"this UNet's {len(layers)} cross-attention layers")
    return projection


def attach(unet, states: list, projections: Optional[list] = None) -> None:
    """Give ``unet`` the adapters of ``states`` (one or several, each checked first unless its built projection is in
    ``projections``): their image projections (``unet.ip_projection``, one per adapter) and every cross-attention's
    image branches (``layer.ip``, one per adapter; diffusers' ``IPAdapterAttnProcessor2_0`` with several)."""
    projections = [check(unet, state) for state in states] if projections is None else projections
    layers = cross_attentions(unet)
    ref = next(unet.parameters())
    unet.ip_projection = nn.ModuleList(projections).to(ref.device, ref.dtype)
    for i, m in enumerate(layers):
        branches = []
        for state, projection in zip(states, projections):
            branch = IPAttention(projection_sizes(projection)[1], m.heads * m.head_dim)
            branch.to_k_ip.weight.data.copy_(state["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"])
            branch.to_v_ip.weight.data.copy_(state["ip_adapter"][f"{2 * i + 1}.to_v_ip.weight"])
            branches.append(branch)
        m.ip = nn.ModuleList(branches).to(ref.device, ref.dtype)


def detach(unet) -> None:
    unet.ip_projection = None
    for m in cross_attentions(unet):
        m.ip = None


def set_scale(unet, scales: list) -> None:
    """Every adapter's weight in every layer (``scales``: one per adapter, each a number or InstantStyle's per-block
    dict: ``fastdiff.models.ip_adapter_scales``), written into the layers' buffers in place; all checked before
    any is written."""
    from .ip_adapter_scales import layer_scales

    layers = named_cross_attentions(unet)
    if len(scales) != adapter_count(unet):
        raise BadArgumentError(f"scale: expected one per loaded IP-Adapter ({adapter_count(unet)}), found "
                               f"{len(scales)}")
    per_adapter = [layer_scales(unet, scale, layers) for scale in scales]
    for i, values in enumerate(per_adapter):
        for (_, m), value in zip(layers, values):
            m.ip[i].scale.fill_(value)


def scale_vector(unet) -> torch.Tensor:
    """Every adapter's scale in every layer as one (K * L,) float32 tensor, adapter by adapter (``cross_attentions``
    order within each): what an exported graph takes as its ``ip_scales`` input. Stacked where the buffers live:
    nothing is read back to the host."""
    layers = cross_attentions(unet)
    return torch.stack([m.ip[k].scale.reshape(()).float() for k in range(adapter_count(unet)) for m in layers])


@contextlib.contextmanager
def scales_from(unet, vector: torch.Tensor):
    """Every layer's adapter scales read from ``vector`` (``scale_vector``'s layout) inside the block, the buffers put
    back after: an exported graph traces them as an input, so a scale set later needs no new export."""
    layers = cross_attentions(unet)
    saved = [(m.ip[k], m.ip[k].scale) for k in range(adapter_count(unet)) for m in layers]
    try:
        for j, (branch, _) in enumerate(saved):
            branch.scale = vector[j]
        yield
    finally:
        for branch, value in saved:
            branch.scale = value


def scales(unet, adapter: int = 0) -> list:
    """One adapter's scale in every layer, in ``cross_attentions`` order."""
    return [float(m.ip[adapter].scale) for m in cross_attentions(unet) if m.ip is not None]


def attached(unet) -> bool:
    return getattr(unet, "ip_projection", None) is not None


def adapter_count(unet) -> int:
    return len(unet.ip_projection) if attached(unet) else 0


def image_rank(unet, adapter: int = 0) -> int:
    """The rank of one image's features an adapter's projection reads: 1 (an embedding (D,): the base adapter's CLIP
    image embedding, Face ID's face embedding, Face ID Plus's packed embedding and hidden states), 2 for Plus and Full
    Face ((S, E) hidden states)."""
    projection = unet.ip_projection[adapter]
    return 2 if reads_hidden_states(projection) and not is_face_id_plus(projection) else 1


def reads_hidden_states(projection: nn.Module) -> bool:
    """Whether a projection reads the encoder's hidden states (Plus, Full Face, Face ID Plus beside its face
    embedding), not an embedding."""
    from .ip_faceid import FaceIDProjection

    return not isinstance(projection, (ImageProjection, FaceIDProjection))


def is_face_id(projection: nn.Module) -> bool:
    """Plain Face ID (a face embedding alone: no image encoder)."""
    from .ip_faceid import FaceIDProjection

    return isinstance(projection, FaceIDProjection)


def is_face_id_plus(projection: nn.Module) -> bool:
    from .ip_faceid_plus import FaceIDPlusProjection

    return isinstance(projection, FaceIDPlusProjection)


def image_width(unet, adapter: int = 0) -> int:
    return projection_sizes(unet.ip_projection[adapter])[0]


def image_tokens(unet, embeds, dtype: torch.dtype) -> Optional[tuple]:
    """Every adapter's tokens (B, N * T, width), as a tuple, for its N images' features (B, N, D) ((B, N, S, E) for
    Plus; the N axis may be left out for one image): each image projected to its T tokens, the images' tokens one
    after another (diffusers' layout). ``embeds``: one tensor for one adapter, or a list / tuple of one per adapter
    (diffusers' ``image_embeds`` list)."""
    if embeds is None:
        return None
    if not attached(unet):
        raise BadArgumentError("image_embeds: given, but this UNet has no IP-Adapter (pipe.load_ip_adapter)")
    embeds = list(embeds) if isinstance(embeds, (list, tuple)) else [embeds]
    if len(embeds) != adapter_count(unet):
        raise BadArgumentError(f"image_embeds: expected one tensor per loaded IP-Adapter ({adapter_count(unet)}), "
                               f"found {len(embeds)}")
    return tuple(_adapter_tokens(unet, i, e, dtype) for i, e in enumerate(embeds))


def image_context(unet, states, embeds, masks, dtype: torch.dtype) -> ImageTokens:
    """The text states with every adapter's tokens (``image_tokens``) and masks: None, or one per adapter (a tensor
    for one adapter), each None or (B, N, H, W) with N the adapter's images."""
    tokens = image_tokens(unet, embeds, dtype)
    if masks is None:
        return ImageTokens(states, tokens)
    masks = tuple(masks) if isinstance(masks, (list, tuple)) else (masks,)
    if len(masks) != len(tokens):
        raise BadArgumentError(f"image_masks: expected one entry (None or a tensor) per loaded IP-Adapter "
                               f"({len(tokens)}), found {len(masks)}")
    for i, (m, t, e) in enumerate(zip(masks, tokens, embeds if isinstance(embeds, (list, tuple)) else [embeds])):
        images = e.shape[1] if e.dim() == image_rank(unet, i) + 2 else 1
        if m is not None and (m.dim() != 4 or m.shape[0] != t.shape[0] or m.shape[1] != images):
            raise BadArgumentError(f"image_masks: expected ({t.shape[0]}, {images}, H, W) masks for IP-Adapter {i} "
                                   f"(one per image), found {tuple(m.shape)}")
    return ImageTokens(states, tokens, masks)


def _adapter_tokens(unet, adapter: int, embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rank, width = image_rank(unet, adapter), image_width(unet, adapter)
    projection = unet.ip_projection[adapter]
    if embeds.dim() == rank + 1:
        embeds = embeds[:, None]
    plus = is_face_id_plus(projection)
    fits = projection.check_packed(embeds.shape[-1]) if plus else embeds.shape[-1] == width
    if embeds.dim() != rank + 2 or not fits or embeds.shape[1] == 0:
        shape = "D" if rank == 1 else "S, E"
        last = (f"{width} + S * {projection.clip_dim} wide (Face ID Plus: the face embedding and the flattened hidden "
                f"states, fastdiff.models.ip_faceid_plus.pack)" if plus else f"{width} wide")
        raise BadArgumentError(f"image_embeds: expected (B, N, {shape}) image features with the last {last} "
                               f"for IP-Adapter {adapter}, found {tuple(embeds.shape)}")
    b, n = embeds.shape[:2]
    tokens = projection(embeds.reshape((b * n,) + tuple(embeds.shape[2:])).to(dtype))  # (B * N, T, width)
    return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])
