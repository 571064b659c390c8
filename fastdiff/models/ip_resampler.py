"""IP-Adapter Plus's image projection: a perceiver resampler (diffusers' ``IPAdapterPlusImageProjection``) that reads
the CLIP vision encoder's penultimate hidden states (S patch tokens of width E per image) and returns Q query tokens
at the UNet's text width.

Read from the original file layout (h94/IP-Adapter's ``ip-adapter-plus_*``): ``latents`` (1, Q, H), ``proj_in``,
``proj_out``, ``norm_out``, and per layer ``layers.i.0`` (``norm1`` on the image tokens, ``norm2`` on the queries,
``to_q``, ``to_kv`` (keys then values), ``to_out``; no biases; 64 channels per head) and ``layers.i.1`` (LayerNorm,
Linear, GELU, Linear; no biases).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64  # IP-Adapter Plus's (diffusers reads the head count as to_q's width / 64)


class PerceiverBlock(nn.Module):
    def __init__(self, width: int, heads: int, ff: int):
        super().__init__()
        inner = heads * HEAD_DIM
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ff, bias=False), nn.GELU(),
                                nn.Linear(ff, width, bias=False))

    def forward(self, x, latents):
        """x (B, S, H) image tokens, latents (B, Q, H) queries -> (B, Q, H)."""
        b = x.shape[0]
        q_in = self.norm2(latents)
        kv_in = torch.cat([self.norm1(x), q_in], dim=1)  # (B, S + Q, H): the queries attend to themselves too
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)

        def heads(t):
            return t.view(b, -1, self.heads, HEAD_DIM).transpose(1, 2)  # (B, heads, L, 64)

        o = F.scaled_dot_product_attention(heads(self.to_q(q_in)), heads(k), heads(v))
        latents = self.to_out(o.transpose(1, 2).reshape(b, -1, self.heads * HEAD_DIM)) + latents
        return self.ff(latents) + latents


class Resampler(nn.Module):
    """(B, S, E) image hidden states -> (B, Q, width) tokens."""

    def __init__(self, embed_dim: int, hidden: int, width: int, queries: int, depth: int, heads: int, ff: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, hidden))
        self.proj_in = nn.Linear(embed_dim, hidden)
        self.proj_out = nn.Linear(hidden, width)
        self.norm_out = nn.LayerNorm(width)
        self.layers = nn.ModuleList([PerceiverBlock(hidden, heads, ff) for _ in range(depth)])

    @property
    def in_features(self) -> int:
        return self.proj_in.in_features

    @classmethod
    def from_state_dict(cls, state: dict) -> "Resampler":
        """(KeyError / IndexError / ValueError on a malformed file: ``ip_adapter.build_projection`` words them)"""
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        q = state["layers.0.0.to_q.weight"]
        if q.shape[0] % HEAD_DIM:
            raise ValueError(f"layers.0.0.to_q.weight's {q.shape[0]} rows are no whole number of {HEAD_DIM}-wide heads")
        net = cls(embed_dim=state["proj_in.weight"].shape[1], hidden=state["latents"].shape[2],
                  width=state["proj_out.weight"].shape[0], queries=state["latents"].shape[1], depth=depth,
                  heads=q.shape[0] // HEAD_DIM, ff=state["layers.0.1.1.weight"].shape[0])
        renamed = {}
        for key, value in state.items():  # layers.i.1.{0,1,3} -> layers.i.ff.{0,1,3}
            parts = key.split(".")
            if parts[0] == "layers" and parts[2] == "1":
                key = ".".join(parts[:2] + ["ff"] + parts[3:])
            elif parts[0] == "layers":
                key = ".".join(parts[:2] + parts[3:])
            renamed[key] = value
        from ..errors import CheckpointError, StateDictMismatchError

        try:
            missing, unexpected = net.load_state_dict(renamed, strict=False)
        except RuntimeError as e:  # (a shape that does not fit)
            raise CheckpointError(f"IP-Adapter Plus: {str(e).strip().splitlines()[-1].strip()}") from e
        if missing or unexpected:
            raise StateDictMismatchError(missing, unexpected, model="IP-Adapter Plus's resampler")
        return net

    def forward(self, x):
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for block in self.layers:
            latents = block(x, latents)
        return self.norm_out(self.proj_out(latents))


def is_plus(proj: dict) -> bool:
    """Whether an adapter's image_proj weights are IP-Adapter Plus's resampler."""
    return "latents" in proj and "proj_in.weight" in proj and "layers.0.0.to_kv.weight" in proj
