"""One tokenizer + text encoder pair of a diffusers pipeline folder (``tokenizer_2/`` + ``text_encoder_2/``, ...).

The tokenizers and encoders are transformers' own classes (CLIP, CLIP with projection, T5's encoder), read with
``from_pretrained`` (safetensors, or a ``.bin`` through ``torch.load(weights_only=True)``), in the precision asked
for at load time as diffusers' ``from_pretrained(torch_dtype=...)`` does it (T5 keeps its ``wo`` layers in float32 in
half precision: an all-fp16 T5 overflows). fastdiff reproduces how each diffusers pipeline *uses* them.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from safetensors import SafetensorError

from ..errors import BackendUnavailableError, CheckpointError, CorruptCheckpointError, UnsupportedConfigError

# the text encoders diffusers' SD 1.x / 2.x, SDXL, SD3 and FLUX.1 pipelines ship
ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
TRUNCATED = "were truncated"  # in the warning a too-long prompt gives (the prompt cache gives it again on a hit)
_NOTES = threading.local()  # this thread's list of warnings to keep with an encoding (``collecting_notes``)
# one from_pretrained at a time in the process: with accelerate installed, transformers 4.x builds models under
# init_empty_weights, which patches nn.Module globally: two pipelines loading at once (an Engine each, encoding their
# first prompts) left one's weights on the meta device ("Cannot copy out of meta tensor")
_LOADING = threading.Lock()


@contextmanager
def collecting_notes():
    """The truncation warnings given in this thread inside the block, as a list (the prompt cache keeps them with
    the encoding, to warn again on a hit). Thread-local, unlike ``warnings.catch_warnings``, which swaps the
    process-wide filters: two pipelines encoding at once would leave them broken."""
    outer = getattr(_NOTES, "current", None)
    _NOTES.current = notes = []
    try:
        yield notes
    finally:
        _NOTES.current = outer


def _warn_truncated(message: str) -> None:
    warnings.warn(message, stacklevel=6)
    notes = getattr(_NOTES, "current", None)
    if notes is not None:
        notes.append(message)


@dataclass
class TextPart:
    """A loaded tokenizer + encoder; ``max_length`` is the token count every prompt is padded / truncated to."""
    name: str  # the encoder's folder name (text_encoder, text_encoder_2, ...)
    tokenizer: object
    encoder: torch.nn.Module
    max_length: int
    # write multi-vector textual inversion tokens out before tokenizing (the SD, SDXL and FLUX.1 pipelines do)
    expand_tokens: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype  # (transformers' dtype: that of its first floating-point parameter)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def tokens(self, prompts: list[str], max_length: Optional[int] = None):
        """transformers' BatchEncoding of ``prompts``, padded and truncated to ``max_length`` tokens as diffusers'
        pipelines do; a truncated prompt is warned about."""
        length = max_length or self.max_length
        if self.expand_tokens:
            from .textual_inversion import expand_prompt

            prompts = [expand_prompt(p, self.tokenizer) for p in prompts]
        batch = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                               return_tensors="pt")
        full = self.tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > batch.input_ids.shape[-1]:
            dropped = self.tokenizer.batch_decode(full[:, length - 1:-1])
            _warn_truncated(f"{self.name}: prompts longer than {length} tokens {TRUNCATED}; dropped: {dropped}")
        return batch


def encoder_config(folder: str, sub: str) -> Optional[dict]:
    """A pipeline folder's ``sub/config.json`` (a transformers config), None where there is none."""
    path = os.path.join(folder, sub, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: expected a transformers config (JSON), found a parse error ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def encoder_class_name(folder: str, sub: str) -> Optional[str]:
    """The transformers class ``folder/sub/config.json`` names (None: no such folder)."""
    config = encoder_config(folder, sub)
    return None if config is None else (config.get("architectures") or [None])[0]


def load_part(folder: str, tokenizer_sub: str, encoder_sub: str, max_length: Optional[int], device,
              dtype: torch.dtype, variant: Optional[str] = None) -> TextPart:
    """Read ``folder/tokenizer_sub`` and ``folder/encoder_sub`` with transformers, onto ``device`` in ``dtype``.

    max_length None: the tokenizer's own ``model_max_length`` (77 for CLIP). variant: diffusers' weight variant
    (``model.fp16.safetensors``), the plain file where the folder has no such variant (as diffusers falls back).
    """
    transformers = _transformers()
    cls_name = encoder_class_name(folder, encoder_sub)
    if cls_name not in ENCODER_CLASSES:
        raise UnsupportedConfigError("architectures", cls_name, model=os.path.join(folder, encoder_sub),
                                     supported=list(ENCODER_CLASSES))
    tok_path, enc_path = os.path.join(folder, tokenizer_sub), os.path.join(folder, encoder_sub)
    if not os.path.isdir(tok_path):
        raise CheckpointError(f"{folder}: {encoder_sub}/ needs its tokenizer in {tokenizer_sub}/, found none")
    # transformers 5 names the load precision `dtype`; 4.x `torch_dtype`
    precision = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}
    cls = getattr(transformers, cls_name)
    with _LOADING:
        return _load_part(transformers, cls, folder, tokenizer_sub, encoder_sub, tok_path, enc_path, precision,
                          max_length, device, variant)


def _load_part(transformers, cls, folder, tokenizer_sub, encoder_sub, tok_path, enc_path, precision, max_length,
               device, variant) -> TextPart:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_path)
        try:
            encoder = cls.from_pretrained(enc_path, variant=variant, **precision)
        except OSError:
            if variant is None:
                raise
            encoder = cls.from_pretrained(enc_path, **precision)
    except (OSError, ValueError, KeyError) as e:  # missing / unreadable files, a config transformers refuses
        raise CheckpointError(f"{folder}: could not read {tokenizer_sub}/ + {encoder_sub}/ with transformers "
                              f"{transformers.__version__}: {e}") from e
    except torch.cuda.OutOfMemoryError:
        raise
    except (SafetensorError, RuntimeError) as e:  # truncated or garbled weights; tensors that do not fit the config
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptCheckpointError(f"{folder}: {encoder_sub}/'s weights are damaged or do not fit its config.json "
                                     f"(transformers {transformers.__version__}: {why})") from e
    encoder = encoder.to(device).eval().requires_grad_(False)
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
def clip_outputs(part: TextPart, prompts: list[str], attention_mask: bool = False):
    """transformers' CLIP output for ``prompts`` (hidden states of every layer included). attention_mask: pass the
    padding mask where the encoder's config asks for one (diffusers' SD 1.x / 2.x pipeline only)."""
    batch = part.tokens(prompts)
    mask = None
    if attention_mask and getattr(part.encoder.config, "use_attention_mask", False):
        mask = batch.attention_mask.to(part.device)
    return part.encoder(batch.input_ids.to(part.device), attention_mask=mask, output_hidden_states=True)


@torch.no_grad()
def t5_states(part: TextPart, prompts: list[str], max_length: Optional[int] = None) -> torch.Tensor:
    """(B, max_length, d_model): T5's encoder output for ``prompts``."""
    return part.encoder(part.tokens(prompts, max_length).input_ids.to(part.device))[0]
