"""IP-Adapter Face ID (h94/IP-Adapter-FaceID's ip-adapter-faceid_sd15 / _sdxl), as diffusers' ``load_ip_adapter``
reads it.

Its image prompt is a face-recognition embedding (insightface's, (B, N, 512), given as ``ip_adapter_image_embeds``;
the CLIP image encoder plays no part), projected to a few tokens by an MLP (``image_proj.proj.0`` / ``proj.2``, then
``norm``: diffusers' ``IPAdapterFaceIDImageProjection``). The file also holds a LoRA on every attention of the UNet
(``ip_adapter.<i>.to_{q,k,v,out}_lora.{down,up}.weight``, ``i`` counting diffusers' ``attn_processors``: each
transformer's self-attention, then its cross-attention), which diffusers loads as the PEFT adapter ``faceid_0`` at
weight 1: here it merges into the weights as ``Pipeline.load_lora(scale=1)`` would (``fastdiff.lora``), and stays
until ``unload_lora()``, as diffusers keeps its adapter after ``unload_ip_adapter``. Face ID Plus (a perceiver over
CLIP hidden states beside the face embedding, and this LoRA) is ``fastdiff.models.ip_faceid_plus``.
"""

from __future__ import annotations

import torch
from torch import nn

LORA_TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
FILE_KEYS = frozenset(f"{layer}.{p}" for layer in ("proj.0", "proj.2", "norm") for p in ("weight", "bias"))


class FaceIDProjection(nn.Module):
    """(B, E) face embeddings -> Linear, GELU, Linear -> (B, T, width) tokens, LayerNorm (diffusers
    ``IPAdapterFaceIDImageProjection``)."""

    def __init__(self, embed_dim: int, hidden: int, width: int, tokens: int):
        super().__init__()
        self.tokens, self.width = tokens, width
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, width * tokens))
        self.norm = nn.LayerNorm(width)

    @classmethod
    def from_state_dict(cls, proj: dict) -> "FaceIDProjection":
        """(KeyError / ValueError / RuntimeError on a malformed file: ``ip_adapter.build_projection`` words them)"""
        hidden, embed = proj["proj.0.weight"].shape
        width = proj["norm.weight"].shape[0]
        rows = proj["proj.2.weight"].shape[0]
        if rows % width:
            raise ValueError(f"proj.2.weight's {rows} rows are no whole number of {width}-wide tokens")
        module = cls(embed, hidden, width, rows // width)
        module.load_state_dict(proj)
        return module

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.width))  # (B, T, width)

    @property
    def in_features(self) -> int:
        return self.proj[0].in_features


def is_faceid(proj: dict) -> bool:
    return set(proj) == FILE_KEYS


def is_lora_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 4 and parts[0].isdigit() and parts[1].endswith("_lora") and parts[2] in ("down", "up")


def attention_layers(unet) -> list:
    """Every attention of the UNet's transformers in diffusers' ``attn_processors`` order (attn1, attn2 of each)."""
    from .unet import TransformerBlock

    blocks = [m for block in (*unet.down_blocks, *unet.up_blocks, *([unet.mid_block] if unet.mid_block else []))
              for m in block.modules() if isinstance(m, TransformerBlock)]  # (``named_cross_attentions``' order)
    return [a for b in blocks for a in (b.attn1, b.attn2)]


def lora_pairs(unet, given: dict) -> list:
    """[(layer, LoraLayer)] of the Face ID LoRA in an adapter's ``ip_adapter`` weights (none: []), every layer and
    shape checked (``fastdiff.lora.targets``' rules) before anything merges."""
    from ..errors import StateDictMismatchError
    from ..lora import LoraLayer

    keys = {k for k in given if is_lora_key(k)}
    if not keys:
        return []
    layers = attention_layers(unet)
    wanted = {f"{i}.{name}_lora.{part}.weight" for i in range(len(layers)) for name in LORA_TARGETS
              for part in ("down", "up")}
    if keys != wanted:
        raise StateDictMismatchError(sorted(wanted - keys), sorted(keys - wanted), [],
                                     model=f"this UNet's {len(layers)} attention layers (IP-Adapter Face ID's LoRA)")
    pairs = []
    for i, attention in enumerate(layers):
        for name, target in LORA_TARGETS.items():
            module = attention.get_submodule(target)
            layer = LoraLayer(down=given[f"{i}.{name}_lora.down.weight"], up=given[f"{i}.{name}_lora.up.weight"])
            layer.check(module.weight.shape)
            pairs.append((module, layer))
    return pairs
