"""Textual inversion: learned token embeddings added to a text encoder, as diffusers' ``load_textual_inversion``.

An embedding file holds one vector or several for a new token (``<cat-toy>``): diffusers' format (one key, the
token, and its (n, d) tensor), A1111's (``string_to_param["*"]`` with the token as ``name``), a safetensors file
of one tensor (``emb_params``), or SDXL's pair (``clip_l`` / ``clip_g``, one per encoder). A token of n vectors
becomes n tokens (``<cat-toy>``, ``<cat-toy>_1``, ...) added to the tokenizer, each with its row in the encoder's
input embeddings; a prompt naming the token is expanded to all n before tokenizing, as the SD, SDXL and FLUX.1
pipelines expand it (``maybe_convert_prompt``).

Files are read with safetensors or ``torch.load(weights_only=True)``: no pickle runs.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import BadArgumentError, CheckpointError

SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}  # SDXL embeddings: one tensor per encoder
CONCEPT_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")  # a diffusers concept folder's, in that order


def read_embeddings(source) -> dict:
    """An embedding file (or an already loaded dict / tensor) as a state dict (a tensor stays a tensor)."""
    if torch.is_tensor(source) or isinstance(source, dict):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise BadArgumentError(f"textual inversion: expected a file path, a state dict or a tensor, found "
                               f"{type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):  # a diffusers concept folder (sd-concepts-library's layout)
        found = [os.path.join(path, f) for f in CONCEPT_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise CheckpointError(f"{path}: a folder without {' or '.join(CONCEPT_FILES)}")
        path = found[0]
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such textual inversion file")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:  # safetensors first, whatever the name (diffusers tries it so), then a tensors-only pickle
        return load_file(path)
    except (SafetensorError, OSError, ValueError):
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # (a damaged file, or a pickle holding more than tensors and plain values)
        raise CheckpointError(f"{path}: not a readable textual inversion embedding ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e


def token_and_vectors(state, token: Optional[str]) -> tuple[str, torch.Tensor]:
    """(the token, its (n, d) float32 vectors) from one embedding's state dict: ``token`` given overrides the
    file's own name (a bare tensor has none)."""
    if torch.is_tensor(state):
        if token is None:
            raise BadArgumentError("textual inversion: a bare tensor names no token: pass token='<name>'")
        found, vectors = token, state
    elif len(state) == 1:  # diffusers' (and a safetensors file's emb_params)
        found, vectors = next(iter(state.items()))
    elif "string_to_param" in state:  # A1111's
        params = state["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise BadArgumentError("textual inversion: an A1111 embedding without string_to_param['*']")
        found, vectors = state.get("name"), params["*"]
    else:
        raise BadArgumentError(f"textual inversion: expected one token's embedding (one key, or A1111's "
                               f"string_to_param), found keys {sorted(map(str, state))[:6]}")
    token = token if token is not None else found
    if not isinstance(token, str) or not token.strip():
        raise BadArgumentError(f"textual inversion: expected a token name, found {token!r}")
    if not torch.is_tensor(vectors) or vectors.dim() not in (1, 2) or not vectors.is_floating_point() or \
            0 in vectors.shape:
        raise BadArgumentError(f"textual inversion {token!r}: expected a (d,) or (n, d) float tensor, found "
                               f"{tuple(vectors.shape) if torch.is_tensor(vectors) else type(vectors).__name__}")
    vectors = vectors.detach().float().reshape(-1, vectors.shape[-1]).clone()  # (ours: re-added on every reload)
    if not bool(torch.isfinite(vectors).all()):
        raise BadArgumentError(f"textual inversion {token!r}: NaN or inf in its vectors")
    return token, vectors


def token_names(token: str, n: int) -> list[str]:
    """The n tokens of a multi-vector embedding: diffusers' ``token``, ``token_1``, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def check_tokens(part, token: str, vectors: torch.Tensor) -> None:
    """Refuse what ``add_tokens`` could not add whole: vectors of another width than ``part``'s token embeddings,
    token names its tokenizer already has."""
    width = part.encoder.get_input_embeddings().weight.shape[-1]
    if vectors.shape[-1] != width:
        raise BadArgumentError(f"textual inversion {token!r}: its vectors are {vectors.shape[-1]} wide and "
                               f"{part.name}'s token embeddings {width}; for SDXL, clip_l goes to text_encoder, "
                               f"clip_g to text_encoder_2")
    taken = [t for t in token_names(token, vectors.shape[0]) if t in part.tokenizer.get_vocab()]
    if taken:
        raise BadArgumentError(f"textual inversion: {taken} already in {part.name}'s tokenizer; pick another token "
                               f"(or pipe.unload_textual_inversion())")


def add_tokens(part, token: str, vectors: torch.Tensor) -> None:
    """``vectors`` (n, d) as new tokens of ``part``'s tokenizer with their rows in its encoder's input embeddings."""
    check_tokens(part, token, vectors)
    tokenizer, encoder = part.tokenizer, part.encoder
    names = token_names(token, vectors.shape[0])
    with torch.no_grad():
        encoder.resize_token_embeddings(len(tokenizer) + len(names))
        weight = encoder.get_input_embeddings().weight
        for name, vector in zip(names, vectors):
            tokenizer.add_tokens(name)
            weight[tokenizer.convert_tokens_to_ids(name)] = vector.to(weight)


def expand_prompt(prompt: str, tokenizer) -> str:
    """``prompt`` with each multi-vector token written out (``<t>`` -> ``<t> <t>_1 <t>_2``), as diffusers'
    ``maybe_convert_prompt``; other prompts unchanged."""
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            names, i = [token], 1
            while f"{token}_{i}" in added:
                names.append(f"{token}_{i}")
                i += 1
            prompt = prompt.replace(token, " ".join(names))
    return prompt


__all__ = ["read_embeddings", "token_and_vectors", "token_names", "check_tokens", "add_tokens", "expand_prompt",
           "SDXL_KEYS", "CONCEPT_FILES"]
