"""Prompts -> a network's text conditioning, computed as the model's own diffusers pipeline computes it.

    family  parts (folder names)                                   states (B, T, D)              pooled (B, P)
    sd      tokenizer + text_encoder (CLIP)                        last layer (final norm)       -
    sdxl    [tokenizer + text_encoder] + tokenizer_2 +             penultimate layers, joined    text_encoder_2's
            text_encoder_2 (CLIP with projection)                  on the width (768 + 1280)     projection
    sd3     two CLIPs with projection + tokenizer_3 +              [CLIPs' penultimate, padded   both projections,
            text_encoder_3 (T5; zeros without it, as diffusers)    to T5's width ; T5] (77+256)  joined (2048)
    flux    CLIP + T5 (tokenizer_2 / text_encoder_2)               T5 (512 tokens)               CLIP's pooler

The encoders load on first use (a pipeline that is only handed embeddings never reads them).
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Sequence, Union

import torch

from ..errors import BadArgumentError
from .text_parts import TextPart, clip_outputs, encoder_class_name, load_part, t5_states

# family -> (tokenizer folder, encoder folder, required?, max tokens (None: the tokenizer's own))
FAMILY_PARTS = {
    "sd": [("tokenizer", "text_encoder", True, None)],
    "sdxl": [("tokenizer", "text_encoder", False, None), ("tokenizer_2", "text_encoder_2", True, None)],
    "sd3": [("tokenizer", "text_encoder", True, 77), ("tokenizer_2", "text_encoder_2", True, 77),
            ("tokenizer_3", "text_encoder_3", False, 256)],
    "flux": [("tokenizer", "text_encoder", True, 77), ("tokenizer_2", "text_encoder_2", True, 512)],
}
T5_TOKENS = {"sd3": 256, "flux": 512}  # diffusers' default max_sequence_length per pipeline


def prompt_family(spec) -> Optional[str]:
    """Which pipeline's prompt encoding a network's ModelSpec calls for (None: not text-conditioned)."""
    if spec.kind == "unet" and spec.cross_attention_dim:
        return "sdxl" if spec.text_embeds_dim is not None else "sd"
    if spec.kind in ("mmdit", "flux"):
        return "sd3" if spec.kind == "mmdit" else "flux"
    return None


class PromptEncoder:
    """Encodes prompts for one network; ``encode`` returns generate()'s text keyword arguments."""

    def __init__(self, folder: str, family: str, states_dim: int, *, zero_negative: bool = False):
        """folder: a diffusers pipeline folder holding the family's tokenizer / text encoder folders. states_dim: the
        network's text width (SD3's T5 width, for zeros where text_encoder_3 is absent). zero_negative: SDXL's
        ``force_zeros_for_empty_prompt`` (no negative prompt -> zero embeddings)."""
        if family not in FAMILY_PARTS:
            raise BadArgumentError(f"prompt family: expected one of {sorted(FAMILY_PARTS)}, found {family!r}")
        self.folder, self.family, self.states_dim, self.zero_negative = folder, family, states_dim, zero_negative
        self.parts_present = [enc for _, enc, _, _ in FAMILY_PARTS[family]
                              if encoder_class_name(folder, enc) is not None]
        self._parts: Optional[dict[str, TextPart]] = None
        # one caller at a time: Engine.submit encodes in its callers' threads, and a fast (Rust) tokenizer called
        # from two threads at once fails ("Already borrowed")
        self._lock = threading.RLock()
        self._where = (torch.device("cpu"), torch.float32)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "PromptEncoder":
        """Where (and in which precision) the encoders run: the pipeline's device and network dtype."""
        device = torch.device(device) if device is not None else self._where[0]
        self._where = (device, dtype or self._where[1])
        if self._parts is not None:
            for part in self._parts.values():
                part.encoder.to(*self._where)
        return self

    def folders(self) -> list[str]:
        """The tokenizer and encoder folders (names inside ``self.folder``) this encoder reads."""
        return [sub for tok, enc, _, _ in FAMILY_PARTS[self.family] if enc in self.parts_present for sub in (tok, enc)]

    def describe(self) -> str:
        classes = [f"{enc} ({encoder_class_name(self.folder, enc)})" for enc in self.parts_present]
        return f"{self.family} prompts: " + ", ".join(classes)

    @property
    def parts(self) -> dict[str, TextPart]:
        with self._lock:
            if self._parts is None:
                parts = {}
                for tok, enc, _, length in FAMILY_PARTS[self.family]:
                    if enc in self.parts_present:
                        parts[enc] = load_part(self.folder, tok, enc, length, *self._where)
                self._parts = parts
        return self._parts

    # ------------------------------------------------------------------------------------------
    def encode(self, prompt: Union[str, Sequence[str]], negative_prompt: Union[str, Sequence[str], None] = None,
               *, guided: bool = False, clip_skip: Optional[int] = None) -> dict:
        """generate()'s keyword arguments for ``prompt`` (one string or a list, one per sample):
        ``encoder_hidden_states`` (+ ``text_embeds`` for pooled-text models), and with ``guided`` their
        ``negative_`` forms from ``negative_prompt`` (default: the empty prompt, or zeros where the pipeline zeroes
        it). clip_skip: as diffusers' ``clip_skip`` (1 = the layer before the one the pipeline uses), for the prompt only:
        diffusers' SD, SDXL and SD3 pipelines encode the negative prompt without it, and so does this."""
        prompts = _prompt_list(prompt, "prompt")
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
            raise BadArgumentError(f"clip_skip: expected a non-negative int, found {clip_skip!r}")
        if clip_skip is not None and self.family == "flux":
            raise BadArgumentError("clip_skip: FLUX.1 reads CLIP's pooled output only (as FluxPipeline); it has no "
                                   "layer to skip")
        if negative_prompt is not None and not guided:
            raise BadArgumentError("negative_prompt: given, but cfg_scale == 1 runs no unconditional pass")
        negatives = None  # no unconditional pass, or zeros (SDXL with no negative prompt)
        if guided and not (negative_prompt is None and self.zero_negative):
            negatives = _prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
            if len(negatives) not in (1, len(prompts)):
                raise BadArgumentError(f"negative_prompt: expected 1 or {len(prompts)} prompts (one per prompt), "
                                       f"found {len(negatives)}")
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives  # (diffusers' batch)
        with self._lock:
            out = self._encode(prompts, clip_skip)
            if guided:
                negative = ({k: torch.zeros_like(v) for k, v in out.items()} if negatives is None
                            else self._encode(negatives, None))  # (diffusers skip no layer for the negative)
                out.update({f"negative_{k}": v for k, v in negative.items()})
        return out

    @torch.no_grad()
    def _encode(self, prompts: list[str], clip_skip: Optional[int]) -> dict:
        parts = self.parts
        if self.family == "sd":
            part = parts["text_encoder"]
            out = clip_outputs(part, prompts)
            if clip_skip is None:
                states = out[0]
            else:  # an earlier layer, through the final norm (diffusers' StableDiffusionPipeline)
                text_model = getattr(part.encoder, "text_model", part.encoder)  # (transformers 5 flattened it)
                states = text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
            return {"encoder_hidden_states": states.to(part.dtype)}
        if self.family == "sdxl":
            layer = -(2 if clip_skip is None else clip_skip + 2)  # "2": SDXL always reads the penultimate layer
            states, pooled = [], None
            for name in ("text_encoder", "text_encoder_2"):
                if name in parts:
                    out = clip_outputs(parts[name], prompts)
                    states.append(out.hidden_states[layer])
                    if out[0].ndim == 2:  # the projection's output (text_encoder_2's)
                        pooled = out[0]
            dtype = parts["text_encoder_2"].dtype
            return {"encoder_hidden_states": torch.cat(states, dim=-1).to(dtype), "text_embeds": pooled.to(dtype)}
        if self.family == "sd3":
            layer = -(2 if clip_skip is None else clip_skip + 2)
            outs = [clip_outputs(parts[name], prompts) for name in ("text_encoder", "text_encoder_2")]
            dtype = parts["text_encoder"].dtype
            clip_states = torch.cat([o.hidden_states[layer].to(dtype) for o in outs], dim=-1)
            if "text_encoder_3" in parts:
                t5 = t5_states(parts["text_encoder_3"], prompts)
            else:  # diffusers' SD3 pipeline without T5: zeros in its place
                t5 = torch.zeros(len(prompts), T5_TOKENS["sd3"], self.states_dim, dtype=dtype, device=clip_states.device)
            clip_states = torch.nn.functional.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1]))
            return {"encoder_hidden_states": torch.cat([clip_states, t5.to(dtype)], dim=-2),
                    "text_embeds": torch.cat([o[0] for o in outs], dim=-1)}
        # flux: CLIP's pooled output, T5's states
        clip = parts["text_encoder"]
        pooled = clip.encoder(clip.token_ids(prompts), output_hidden_states=False).pooler_output
        t5 = parts["text_encoder_2"]
        return {"encoder_hidden_states": t5_states(t5, prompts).to(t5.dtype), "text_embeds": pooled.to(clip.dtype)}


def find_prompt_encoder(folder: str, spec, zero_negative: Optional[bool] = None) -> Optional[PromptEncoder]:
    """The PromptEncoder of a diffusers pipeline folder for its network (None where the folder lacks the family's
    required text encoders, or the network takes no text). zero_negative None: SDXL's model_index.json says."""
    family = prompt_family(spec)
    if family is None or not os.path.isdir(folder):
        return None
    required = [enc for _, enc, needed, _ in FAMILY_PARTS[family] if needed]
    if any(encoder_class_name(folder, enc) is None for enc in required):
        return None
    if zero_negative is None and family == "sdxl":  # StableDiffusionXLPipeline's default; the refiner says false
        from ..checkpoints.diffusers_folder import read_json

        index = os.path.join(folder, "model_index.json")
        config = read_json(index) if os.path.isfile(index) else {}
        zero_negative = bool(config.get("force_zeros_for_empty_prompt", True))
    return PromptEncoder(folder, family, spec.cross_attention_dim, zero_negative=bool(zero_negative))


def _prompt_list(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadArgumentError(f"{name}: expected a string or a non-empty list of strings, found {prompt!r}")
    return prompts
