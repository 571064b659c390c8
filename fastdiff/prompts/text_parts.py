"""One tokenizer + text encoder pair of a diffusers pipeline folder (``tokenizer_2/`` + ``text_encoder_2/``, ...).

The tokenizers and encoders are transformers' own classes (CLIP, CLIP with projection, T5's encoder), read with
``from_pretrained`` (safetensors, or a ``.bin`` through ``torch.load(weights_only=True)``): fastdiff reproduces how
each diffusers pipeline *uses* them, not the encoders themselves.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailableError, CheckpointError, UnsupportedConfigError

# the text encoders diffusers' SD 1.x / 2.x, SDXL, SD3 and FLUX.1 pipelines ship
ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


@dataclass
class TextPart:
    """A loaded tokenizer + encoder; ``max_length`` is the token count every prompt is padded / truncated to."""
    name: str  # the encoder's folder name (text_encoder, text_encoder_2, ...)
    tokenizer: object
    encoder: torch.nn.Module
    max_length: int

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def token_ids(self, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
        """(B, max_length) ids, padded and truncated as diffusers' pipelines do; a truncated prompt is warned about."""
        length = max_length or self.max_length
        ids = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids
        full = self.tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            dropped = self.tokenizer.batch_decode(full[:, length - 1:-1])
            warnings.warn(f"{self.name}: prompts longer than {length} tokens were truncated; dropped: {dropped}",
                          stacklevel=4)
        return ids.to(self.device)


def encoder_class_name(folder: str, sub: str) -> str | None:
    """The transformers class a pipeline folder's ``sub/config.json`` names (None: no such folder)."""
    path = os.path.join(folder, sub, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            names = json.load(f).get("architectures") or []
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: expected a transformers config (JSON with 'architectures'), found {e}") from e
    return names[0] if names else None


def load_part(folder: str, tokenizer_sub: str, encoder_sub: str, max_length: int | None, device,
              dtype: torch.dtype) -> TextPart:
    """Read ``folder/tokenizer_sub`` and ``folder/encoder_sub`` with transformers, onto ``device`` in ``dtype``.

    max_length None: the tokenizer's own ``model_max_length`` (77 for CLIP).
    """
    transformers = _transformers()
    cls_name = encoder_class_name(folder, encoder_sub)
    if cls_name not in ENCODER_CLASSES:
        raise UnsupportedConfigError("architectures", cls_name, model=os.path.join(folder, encoder_sub),
                                     supported=list(ENCODER_CLASSES))
    tok_path, enc_path = os.path.join(folder, tokenizer_sub), os.path.join(folder, encoder_sub)
    if not os.path.isdir(tok_path):
        raise CheckpointError(f"{folder}: {encoder_sub}/ needs its tokenizer in {tokenizer_sub}/, found none")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_path)
        encoder = getattr(transformers, cls_name).from_pretrained(enc_path)
    except (OSError, ValueError, KeyError) as e:  # missing / unreadable files, a config transformers refuses
        raise CheckpointError(f"{folder}: could not read {tokenizer_sub}/ + {encoder_sub}/ with transformers "
                              f"{transformers.__version__}: {e}") from e
    encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    length = max_length or int(tokenizer.model_max_length)
    return TextPart(encoder_sub, tokenizer, encoder, length)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise BackendUnavailableError("prompts need transformers for the text encoders (pip install "
                                      "'fastdiff[text]' or transformers); without it pass encoder_hidden_states / "
                                      "text_embeds") from e
    return transformers


@torch.no_grad()
def clip_outputs(part: TextPart, prompts: list[str]):
    """transformers' CLIP output for ``prompts`` (hidden states of every layer included)."""
    mask = None
    if getattr(part.encoder.config, "use_attention_mask", False):  # (as diffusers' SD pipeline asks)
        mask = part.tokenizer(prompts, padding="max_length", max_length=part.max_length, truncation=True,
                              return_tensors="pt").attention_mask.to(part.device)
    return part.encoder(part.token_ids(prompts), attention_mask=mask, output_hidden_states=True)


@torch.no_grad()
def t5_states(part: TextPart, prompts: list[str]) -> torch.Tensor:
    """(B, max_length, d_model): T5's encoder output for ``prompts``."""
    return part.encoder(part.token_ids(prompts))[0]
