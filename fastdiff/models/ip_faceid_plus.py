"""IP-Adapter Face ID Plus and Plus v2 (h94/IP-Adapter-FaceID's ip-adapter-faceid-plus_sd15,
ip-adapter-faceid-plusv2_sd15 / _sdxl): diffusers' ``IPAdapterFaceIDPlusImageProjection``.

Its image prompt is two things per image: a face-recognition embedding (insightface's, 512 wide) and the CLIP vision
encoder's penultimate hidden states of the face crop (S, E), as IP-Adapter Plus reads them. The embedding goes
through an MLP (``proj.0``, GELU, ``proj.2``) to T tokens and a LayerNorm (``norm``): the ID tokens. These are the
queries of a perceiver over the projected hidden states (``perceiver_resampler.proj_in``, ``layers.i.0`` attention
and ``layers.i.1`` feed-forward, IP-Adapter Plus's blocks: ``fastdiff.models.ip_resampler``), then ``proj_out`` and
``norm_out``. Plus v2 was trained with a shortcut: out = ID tokens + shortcut_scale * out (diffusers' ``shortcut``
/ ``shortcut_scale``; the files of Plus and Plus v2 hold the same keys, so the loader decides:
``Pipeline.load_ip_adapter``'s ``faceid_shortcut``). The LoRA beside it in the file is plain Face ID's
(``fastdiff.models.ip_faceid``).

The UNet reads one tensor per image for it, as for every other adapter: the embedding and the flattened hidden states
side by side, (B, N, D + S * E) (``pack``), so classifier-free guidance, captured graphs and the Engine carry it as
they carry any image features.
"""

from __future__ import annotations

import torch
from torch import nn

from .ip_resampler import HEAD_DIM, PerceiverBlock

PREFIX = "perceiver_resampler."
ID_KEYS = frozenset(f"{layer}.{p}" for layer in ("proj.0", "proj.2", "norm") for p in ("weight", "bias"))


class FaceIDPlusProjection(nn.Module):
    """(B, D + S * E) packed features (``pack``) -> (B, T, out_width) tokens."""

    def __init__(self, id_dim: int, id_hidden: int, clip_dim: int, width: int, tokens: int, out_width: int,
                 depth: int, heads: int, ff: int):
        super().__init__()
        self.id_dim, self.clip_dim, self.tokens, self.width = id_dim, clip_dim, tokens, width
        self.proj = nn.Sequential(nn.Linear(id_dim, id_hidden), nn.GELU(), nn.Linear(id_hidden, width * tokens))
        self.norm = nn.LayerNorm(width)
        self.proj_in = nn.Linear(clip_dim, width)
        self.layers = nn.ModuleList([PerceiverBlock(width, heads, ff) for _ in range(depth)])
        self.proj_out = nn.Linear(width, out_width)
        self.norm_out = nn.LayerNorm(out_width)
        self.shortcut = False  # (a Python flag: the graph differs with it; the scale is a buffer, changed in place)
        self.register_buffer("shortcut_scale", torch.ones(()), persistent=False)

    @classmethod
    def from_state_dict(cls, proj: dict) -> "FaceIDPlusProjection":
        """From the original file's ``image_proj`` weights (KeyError / ValueError on a malformed file:
        ``ip_adapter.build_projection`` words them; missing or unknown keys: StateDictMismatchError naming them)."""
        from ..errors import CheckpointError, StateDictMismatchError

        depth = 1 + max((int(k.split(".")[2]) for k in proj if k.startswith(PREFIX + "layers.")
                         and k.split(".")[2].isdigit()), default=-1)
        hidden, id_dim = proj["proj.0.weight"].shape
        width = proj["norm.weight"].shape[0]
        rows = proj["proj.2.weight"].shape[0]
        if rows % width:
            raise ValueError(f"proj.2.weight's {rows} rows are no whole number of {width}-wide tokens")
        q = proj[PREFIX + "layers.0.0.to_q.weight"]
        if q.shape[0] % HEAD_DIM:
            raise ValueError(f"layers.0.0.to_q.weight's {q.shape[0]} rows are no whole number of {HEAD_DIM}-wide heads")
        net = cls(id_dim, hidden, proj[PREFIX + "proj_in.weight"].shape[1], width, rows // width,
                  proj[PREFIX + "proj_out.weight"].shape[0], depth, q.shape[0] // HEAD_DIM,
                  proj[PREFIX + "layers.0.1.1.weight"].shape[0])
        renamed = {}
        for key, value in proj.items():  # perceiver_resampler.layers.i.0.x -> layers.i.x, .i.1.j -> .i.ff.j
            parts = key[len(PREFIX):].split(".") if key.startswith(PREFIX) else key.split(".")
            if key.startswith(PREFIX) and parts[0] == "layers" and len(parts) > 3:
                parts = parts[:2] + (["ff"] if parts[2] == "1" else []) + parts[3:]
            elif not key.startswith(PREFIX) and key not in ID_KEYS:
                parts = ["(unknown)", key]  # (a key outside both parts: reported under its own name)
            renamed[".".join(parts)] = value
        try:
            missing, unexpected = net.load_state_dict(renamed, strict=False)
        except RuntimeError as e:  # (a shape that does not fit)
            raise CheckpointError(f"IP-Adapter Face ID Plus: {str(e).strip().splitlines()[-1].strip()}") from e
        if missing or unexpected:
            raise StateDictMismatchError([_file_key(k) for k in missing], [_file_key(k) for k in unexpected],
                                         model="IP-Adapter Face ID Plus's projection")
        return net

    def set_shortcut(self, on: bool, scale: float = 1.0) -> None:
        """Plus v2's shortcut (out = ID tokens + scale * out); needs the perceiver's width to be the tokens'."""
        from ..errors import BadArgumentError

        if on and self.proj_out.out_features != self.width:
            raise BadArgumentError(f"faceid_shortcut: the shortcut adds the {self.width}-wide ID tokens to the "
                                   f"{self.proj_out.out_features}-wide output; expected equal widths")
        self.shortcut = bool(on)
        self.shortcut_scale.fill_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        ids = self.norm(self.proj(x[:, :self.id_dim]).reshape(b, self.tokens, self.width))  # (B, T, width)
        states = self.proj_in(x[:, self.id_dim:].reshape(b, -1, self.clip_dim))  # (B, S, width)
        latents = ids
        for block in self.layers:
            latents = block(states, latents)  # (B, T, width)
        out = self.norm_out(self.proj_out(latents))  # (B, T, out_width)
        return ids + self.shortcut_scale * out if self.shortcut else out

    @property
    def in_features(self) -> int:
        """The face embedding's width (what ``ip_adapter_image_embeds`` carries for it)."""
        return self.id_dim

    def check_packed(self, width: int) -> bool:
        """Whether ``width`` is a packed feature width: the embedding's and S >= 1 hidden states'."""
        return width > self.id_dim and (width - self.id_dim) % self.clip_dim == 0


def pack(ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """(..., D) face embeddings and (..., S, E) hidden states -> (..., D + S * E) (``FaceIDPlusProjection``'s input)."""
    return torch.cat([ids, states.flatten(-2).to(ids.dtype)], dim=-1)


def is_faceid_plus(proj: dict) -> bool:
    return any(k.startswith(PREFIX) for k in proj)


def _file_key(name: str) -> str:
    """A module key of ``FaceIDPlusProjection`` as the file names it."""
    parts = name.split(".")
    if parts[0] == "(unknown)":
        return ".".join(parts[1:])
    if parts[0] in ("proj", "norm"):
        return name
    if parts[0] == "layers":
        parts = parts[:2] + (["1"] + parts[3:] if parts[2] == "ff" else ["0"] + parts[2:])
    return PREFIX + ".".join(parts)
