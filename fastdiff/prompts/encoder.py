"""Prompts -> a network's text conditioning, computed as the model's own diffusers pipeline computes it.

    family  parts (folder names)                                   states (B, T, D)              pooled (B, P)
    sd      tokenizer + text_encoder (CLIP)                        last layer (final norm)       -
    sdxl    [tokenizer + text_encoder] + tokenizer_2 +             penultimate layers, joined    text_encoder_2's
            text_encoder_2 (CLIP with projection)                  on the width (768 + 1280)     projection
    sd3     two CLIPs with projection + tokenizer_3 +              [CLIPs' penultimate, padded   both projections,
            text_encoder_3 (T5; zeros without it, as diffusers)    to T5's width ; T5] (77+256)  joined (2048)
    flux    CLIP + T5 (tokenizer_2 / text_encoder_2)               T5 (512 tokens)               CLIP's pooler

Each encoder reads one of the pipeline's prompts, as diffusers' pipelines route them: ``prompt`` the first,
``prompt_2`` the second (SDXL's text_encoder_2, SD3's second CLIP, FLUX.1's T5), ``prompt_3`` the third (SD3's
T5); each defaults to ``prompt``, and each ``negative_prompt_N`` to ``negative_prompt``.

The encoders load on first use (a pipeline that is only handed embeddings never reads them).
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Optional, Sequence, Union

import torch

from ..errors import BadArgumentError, CheckpointError
from .cache import DEFAULT_MAX_BYTES, EncodingCache
from .text_parts import (TextPart, clip_outputs, collecting_notes, encoder_config, encoder_class_name, load_part,
                         t5_states)
from .textual_inversion import SDXL_KEYS, add_tokens, check_tokens, read_embeddings, token_and_vectors

# family -> (tokenizer folder, encoder folder, required?, max tokens (None: the tokenizer's own))
FAMILY_PARTS = {
    "sd": [("tokenizer", "text_encoder", True, None)],
    "sdxl": [("tokenizer", "text_encoder", False, None), ("tokenizer_2", "text_encoder_2", True, None)],
    "sd3": [("tokenizer", "text_encoder", True, 77), ("tokenizer_2", "text_encoder_2", True, 77),
            ("tokenizer_3", "text_encoder_3", False, 256)],
    "flux": [("tokenizer", "text_encoder", True, 77), ("tokenizer_2", "text_encoder_2", True, 512)],
}
T5_PART = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}  # families with a T5 (max_sequence_length applies)
CLIP_SKIP_BASE = {"sd": 1, "sdxl": 2, "sd3": 2}  # the layer each pipeline reads counts from: -(clip_skip + base)
# the families whose diffusers pipelines read textual inversion tokens (TextualInversionLoaderMixin)
TEXTUAL_INVERSION_FAMILIES = ("sd", "sdxl", "flux")
# the texts of the second and third encoders (diffusers' names), beside prompt / negative_prompt
EXTRA_PROMPTS = ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3")


def prompt_family(spec) -> Optional[str]:
    """Which pipeline's prompt encoding a network's ModelSpec calls for (None: not text-conditioned)."""
    if spec.kind == "unet" and spec.cross_attention_dim:
        return "sdxl" if spec.text_embeds_dim is not None else "sd"
    if spec.kind in ("mmdit", "flux"):
        return "sd3" if spec.kind == "mmdit" else "flux"
    return None


class PromptEncoder:
    """Encodes prompts for one network; ``encode`` returns generate()'s text keyword arguments."""

    def __init__(self, folder: str, family: str, states_dim: int, *, zero_negative: bool = False,
                 variant: Optional[str] = None, cache_bytes: int = DEFAULT_MAX_BYTES):
        """folder: a diffusers pipeline folder holding the family's tokenizer / text encoder folders. states_dim: the
        network's text width (SD3's T5 width, for zeros where text_encoder_3 is absent). zero_negative: SDXL's
        ``force_zeros_for_empty_prompt`` (no negative prompt -> zero embeddings). variant: diffusers' weight
        variant (``fp16``). cache_bytes: how much of recent encodings to keep (``self.cache``; 0: none): a repeated
        call (an Engine's negative prompt, a prompt resent with another seed) returns the same tensors without
        running the encoders."""
        if family not in FAMILY_PARTS:
            raise BadArgumentError(f"prompt family: expected one of {sorted(FAMILY_PARTS)}, found {family!r}")
        self.folder, self.family, self.states_dim, self.zero_negative = folder, family, states_dim, zero_negative
        self.variant = variant
        self.parts_present = [enc for _, enc, _, _ in FAMILY_PARTS[family]
                              if encoder_class_name(folder, enc) is not None]
        self._parts: Optional[dict[str, TextPart]] = None
        # one caller at a time: Engine.submit encodes in its callers' threads, and a fast (Rust) tokenizer called
        # from two threads at once fails ("Already borrowed")
        self._lock = threading.RLock()
        self._where = (torch.device("cpu"), torch.float32)
        self.cache = EncodingCache(cache_bytes)
        self._probe = None  # (the parameters' ids, views of two values of each): see _weights_version
        self.loras: list = []  # [({encoder folder: {module: LoraLayer}}, scale)], merged again after every load
        self.embeddings: list = []  # [(encoder folder, token, (n, d) vectors)]: textual inversion, added again too

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "PromptEncoder":
        """Where (and in which precision) the encoders run: the pipeline's device and network dtype. A new dtype
        re-reads loaded encoders on their next use (so T5 keeps its float32 layers, as from_pretrained does)."""
        with self._lock:
            device = torch.device(device) if device is not None else self._where[0]
            new_dtype = dtype or self._where[1]
            if (device, new_dtype) != self._where:  # encodings made elsewhere, or in another precision
                self._forget(reload=new_dtype != self._where[1])
            self._where = (device, new_dtype)
            for part in (self._parts or {}).values():
                part.encoder.to(device)
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
                        parts[enc] = load_part(self.folder, tok, enc, length, *self._where, variant=self.variant)
                for layers, scale in self.loras:  # (a reload in another precision keeps the merged LoRAs)
                    _merge_lora(parts, layers, scale)
                for part in parts.values():
                    part.expand_tokens = self.family in TEXTUAL_INVERSION_FAMILIES
                for enc, token, vectors in self.embeddings:  # (and the textual inversion tokens)
                    add_tokens(parts[enc], token, vectors)
                self._parts, self._probe = parts, None
            return self._parts

    def add_lora(self, layers: dict, scale: float) -> dict:
        """Merge a LoRA's text-encoder layers ({encoder folder: {module: LoraLayer}}) into the encoders (loading
        them), and keep it to merge again whenever they are read anew. Returns {encoder folder: layers merged}."""
        missing = sorted(set(layers) - set(self.parts_present))
        if missing:
            raise BadArgumentError(f"lora: layers for {missing}, which this pipeline's text encoders lack (it has "
                                   f"{self.parts_present})")
        with self._lock:
            _merge_lora(self.parts, layers, scale)
            self.loras.append((layers, scale))
            self.cache.clear()
        return {part: len(entries) for part, entries in layers.items()}

    def add_textual_inversion(self, source, token: Optional[str] = None, text_encoder: Optional[str] = None) -> dict:
        """Add a textual inversion embedding (``fastdiff.prompts.textual_inversion``) to the encoders (loading
        them), kept to add again whenever they are read anew. ``text_encoder``: the encoder folder it belongs to
        (default: the first CLIP; an SDXL file with ``clip_l`` / ``clip_g`` goes to both). Returns {token: vectors}
        per encoder folder."""
        if self.family not in TEXTUAL_INVERSION_FAMILIES:
            raise BadArgumentError(f"textual inversion: the {self.family} pipeline reads none (diffusers' SD, SDXL "
                                   f"and FLUX.1 pipelines do)")
        state = read_embeddings(source)
        if isinstance(state, dict) and set(state) == set(SDXL_KEYS):  # (one tensor per SDXL encoder)
            if text_encoder is not None:
                raise BadArgumentError("text_encoder: an SDXL embedding (clip_l / clip_g) names its own encoders")
            if token is None:
                raise BadArgumentError("textual inversion: an SDXL embedding (clip_l / clip_g) names no token: pass "
                                       "token='<name>'")
            jobs = [(SDXL_KEYS[k], v) for k, v in state.items() if SDXL_KEYS[k] in self.parts_present]
        else:
            jobs = [(text_encoder or self.parts_present[0], state)]
        for enc, _ in jobs:
            if enc not in self.parts_present:
                raise BadArgumentError(f"text_encoder: expected one of this pipeline's {self.parts_present}, found "
                                       f"{enc!r}")
        added = {}
        with self._lock:
            parts = self.parts
            named = [(enc, *token_and_vectors(one, token)) for enc, one in jobs]
            for enc, name, vectors in named:  # (all checked before any is added: a refused pair adds nothing)
                check_tokens(parts[enc], name, vectors)
            for enc, name, vectors in named:
                add_tokens(parts[enc], name, vectors)
                self.embeddings.append((enc, name, vectors))
                added.setdefault(enc, {})[name] = vectors.shape[0]
            self.cache.clear()
        return added

    def clear_textual_inversions(self) -> None:
        """Drop the added tokens: the tokenizers and encoders are read again from their folders on the next prompt."""
        with self._lock:
            if self.embeddings:
                self.embeddings = []
                self._forget(reload=True)

    def clear_loras(self) -> None:
        """Drop the merged LoRAs: the encoders are read again from their folders on the next prompt."""
        with self._lock:
            if self.loras:
                self.loras = []
                self._forget(reload=True)

    def _forget(self, reload: bool) -> None:
        """Drop the cached encodings and the weights' probe (its views would keep old weights alive); ``reload``:
        the loaded encoders too, read again from their folders on the next prompt."""
        self.cache.clear()
        self._probe = None
        if reload:
            self._parts = None

    def max_clip_skip(self) -> Optional[int]:
        """The largest clip_skip the CLIP encoders' depth allows (None: clip_skip does not apply)."""
        if self.family not in CLIP_SKIP_BASE:
            return None
        depths = [encoder_config(self.folder, enc).get("num_hidden_layers", 12) for enc in self.parts_present
                  if enc != T5_PART.get(self.family)]
        return min(depths) + 1 - CLIP_SKIP_BASE[self.family]

    # ------------------------------------------------------------------------------------------
    def encode(self, prompt: Union[str, Sequence[str]], negative_prompt: Union[str, Sequence[str], None] = None,
               *, guided: bool = False, clip_skip: Optional[int] = None, max_sequence_length: Optional[int] = None,
               prompt_2=None, prompt_3=None, negative_prompt_2=None, negative_prompt_3=None) -> dict:
        """generate()'s keyword arguments for ``prompt`` (one string or a list, one per sample):
        ``encoder_hidden_states`` (+ ``text_embeds`` for pooled-text models), and with ``guided`` their
        ``negative_`` forms from ``negative_prompt`` (default: the empty prompt, or zeros where the pipeline zeroes
        it; FLUX.1 needs one: its pipeline runs true CFG only against a negative prompt).
        prompt_2 / prompt_3 (and their negatives): what the second / third encoder reads (``self.slots()``), as the
        diffusers pipeline's arguments of those names; each defaults to ``prompt`` (``negative_prompt``), an empty
        string too (diffusers' ``prompt_2 or prompt``). A prompt no encoder of this model reads is refused.
        clip_skip: as diffusers' ``clip_skip`` (1 = the layer before the one the pipeline uses), for the prompt only:
        diffusers' SD, SDXL and SD3 pipelines encode the negative prompt without it, and so does this.
        max_sequence_length: T5's token count (SD3 / FLUX.1; diffusers' defaults 256 / 512)."""
        prompt_list(prompt, "prompt")
        self._check_options(clip_skip, max_sequence_length)
        extras = {"prompt_2": prompt_2, "prompt_3": prompt_3, "negative_prompt_2": negative_prompt_2,
                  "negative_prompt_3": negative_prompt_3}
        self._check_extra_prompts(extras, negative_prompt, guided)
        if negative_prompt is not None and not guided:
            raise BadArgumentError("negative_prompt: given, but cfg_scale == 1 runs no unconditional pass")
        if guided and negative_prompt is None and self.family == "flux":
            raise BadArgumentError("negative_prompt: cfg_scale != 1 (or a CFG++ sampler) on FLUX.1 is true "
                                   "classifier-free guidance, which FluxPipeline runs only against a negative prompt: "
                                   "expected one (\"\" for the empty prompt), found None. FLUX.1 dev's distilled "
                                   "strength is guidance=")
        # slot -> texts, as the pipelines pick them (`prompt_2 or prompt`: an empty string falls back too)
        positive = {1: prompt, 2: prompt_2 or prompt, 3: prompt_3 or prompt}
        if negative_prompt is not None:  # ([] or 0 would read as "" below)
            prompt_list(negative_prompt, "negative_prompt")
        negative = None  # no unconditional pass, or zeros (SDXL with no negative prompt)
        if guided and not (negative_prompt is None and self.zero_negative):
            first = negative_prompt or ""
            negative = {1: first, 2: negative_prompt_2 or first, 3: negative_prompt_3 or first}
        positive, negative = self._texts_per_encoder(positive, negative)
        with self._lock:
            out = self._encode_cached(positive, clip_skip, max_sequence_length)
            if guided:
                unconditional = ({k: torch.zeros_like(v) for k, v in out.items()} if negative is None
                                 else self._encode_cached(negative, None, max_sequence_length))  # (no clip_skip)
                out.update({f"negative_{k}": v for k, v in unconditional.items()})
        return out

    def slots(self) -> dict[str, int]:
        """encoder folder -> which prompt it reads (1: ``prompt``, 2: ``prompt_2``, 3: ``prompt_3``). An SDXL
        refiner's one encoder (text_encoder_2) reads ``prompt``: diffusers' pipeline zips [prompt, prompt_2] with the
        encoders it has."""
        slots = {enc: i + 1 for i, (_, enc, _, _) in enumerate(FAMILY_PARTS[self.family]) if enc in self.parts_present}
        if self.family == "sdxl" and "text_encoder" not in slots:
            slots["text_encoder_2"] = 1
        return slots

    def _check_extra_prompts(self, extras: dict, negative_prompt, guided: bool) -> None:
        """prompt_2 / prompt_3 / their negatives: strings or lists, read by one of this model's encoders, and each
        negative where an unconditional pass encodes it."""
        read = set(self.slots().values())
        for name, texts in extras.items():
            if texts is None:
                continue
            prompt_list(texts, name)
            slot = int(name[-1])
            if slot not in read:
                readers = ", ".join(f"{enc} reads {'prompt' if i == 1 else f'prompt_{i}'}"
                                    for enc, i in sorted(self.slots().items(), key=lambda item: item[1]))
                raise BadArgumentError(f"{name}: no text encoder of this {self.family} model reads it ({readers})")
            if name.startswith("negative_"):
                if not guided:
                    raise BadArgumentError(f"{name}: given, but cfg_scale == 1 runs no unconditional pass")
                if negative_prompt is None and (self.zero_negative or self.family == "flux"):
                    why = ("this SDXL pipeline zeroes the unconditional embeddings when negative_prompt is None "
                           "(force_zeros_for_empty_prompt)" if self.zero_negative else
                           "FluxPipeline runs true CFG only against a negative_prompt")
                    raise BadArgumentError(f"{name}: given without negative_prompt, but {why}; pass negative_prompt "
                                           f"too (\"\" for the empty prompt)")

    def _texts_per_encoder(self, positive: dict, negative: Optional[dict]) -> tuple[dict, Optional[dict]]:
        """slot -> texts (a string or a list) => encoder folder -> one list of B prompts each, B the longest list
        (a single prompt serves every sample; diffusers' batch)."""
        slots = self.slots()
        named = {**{(False, enc): prompt_list(positive[slot], _slot_name(slot)) for enc, slot in slots.items()},
                 **{(True, enc): prompt_list(negative[slot], _slot_name(slot, True))
                    for enc, slot in slots.items() if negative is not None}}
        b = max(len(texts) for texts in named.values())
        if any(len(texts) not in (1, b) for texts in named.values()):
            counts = {_slot_name(slots[enc], is_negative): len(texts) for (is_negative, enc), texts in named.items()}
            raise BadArgumentError("prompts: expected one each, or one per sample in every list (the lists of the "
                                   "same length), found " + ", ".join(f"{n}: {c}" for n, c in counts.items()))
        lists = {key: texts * b if len(texts) == 1 else texts for key, texts in named.items()}
        by_encoder = [{enc: texts for (is_negative, enc), texts in lists.items() if is_negative == side}
                      for side in (False, True)]
        return by_encoder[0], (by_encoder[1] if negative is not None else None)

    def _check_options(self, clip_skip, max_sequence_length) -> None:
        if clip_skip is not None:
            top = self.max_clip_skip()
            if top is None:
                raise BadArgumentError("clip_skip: FLUX.1 reads CLIP's pooled output only (as FluxPipeline); it has "
                                       "no layer to skip")
            if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= top:
                raise BadArgumentError(f"clip_skip: expected an int in [0, {top}] (this model's CLIP depth), found "
                                       f"{clip_skip!r}")
        if max_sequence_length is not None:
            if self.family not in T5_PART:
                raise BadArgumentError(f"max_sequence_length: applies to T5 prompts (SD3, FLUX.1), not to this "
                                       f"{self.family} model's CLIP (77 tokens)")
            if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or not \
                    1 <= max_sequence_length <= 512:
                raise BadArgumentError(f"max_sequence_length: expected an int in [1, 512], found "
                                       f"{max_sequence_length!r}")

    def _encode_cached(self, texts: dict, clip_skip: Optional[int], t5_length: Optional[int]) -> dict:
        """``_encode`` through ``self.cache``: one call's prompts (per encoder), options, placement and the encoders'
        weights (``_weights_version``) make the key (a whole call, so a hit returns exactly
        what encoding that batch returned); a hit gives the encoding's warnings (a truncated prompt) again."""
        self.parts  # loaded first: their weights are part of the key
        key = (tuple((enc, tuple(texts[enc])) for enc in sorted(texts)), clip_skip, t5_length, *self._where,
               self._weights_version())
        hit = self.cache.get(key)
        if hit is not None:
            out, notes = hit
            for note in notes:
                warnings.warn(note, stacklevel=4)
            return out
        with collecting_notes() as notes:
            out = self._encode(texts, clip_skip, t5_length)
        self.cache.put(key, out, tuple(notes))
        return out

    def _weights_version(self) -> Optional[tuple]:
        """A fingerprint of the loaded encoders' parameters: an edited or reloaded weight makes earlier encodings
        stale. Their objects and in-place version counters see ``load_state_dict``, in-place ops and new modules;
        a write through ``.data`` (what PEFT's ``merge_and_unload`` does) bumps no counter, so two values of every
        parameter are read too (a merged update changes nearly all of a weight's values): one gather of 1-element
        views and one copy to the host per call. A write of a few rows through ``.data`` (a token's embedding
        set by hand) can go unseen: ``self.cache.clear()`` after one (``add_textual_inversion`` clears it). None
        before the encoders load."""
        if self._parts is None:
            return None
        params = [p for part in self._parts.values() for p in part.encoder.parameters()]
        where = tuple((id(p), p.data_ptr()) for p in params)
        if self._probe is None or self._probe[0] != where:
            views = [p.detach().reshape(-1)[i:i + 1] for p in params if p.numel()
                     for i in {p.numel() // 3, (2 * p.numel()) // 3}]  # (views: they read the storage as it is now)
            self._probe = (where, views)
        views = self._probe[1]
        values = torch.cat(views).float().cpu().numpy().tobytes() if views else b""
        return tuple(p._version for p in params), where, values

    @torch.no_grad()
    def _encode(self, texts: dict, clip_skip: Optional[int], t5_length: Optional[int]) -> dict:
        """texts: encoder folder -> its B prompts (``_texts_per_encoder``)."""
        parts = self.parts
        if self.family == "sd":
            part = parts["text_encoder"]
            out = clip_outputs(part, texts["text_encoder"], attention_mask=True)
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
                    out = clip_outputs(parts[name], texts[name])
                    states.append(out.hidden_states[layer])
                    if out[0].ndim == 2:  # the projection's output (text_encoder_2's)
                        pooled = out[0]
            dtype = parts["text_encoder_2"].dtype
            return {"encoder_hidden_states": torch.cat(states, dim=-1).to(dtype), "text_embeds": pooled.to(dtype)}
        if self.family == "sd3":
            layer = -(2 if clip_skip is None else clip_skip + 2)
            outs = [clip_outputs(parts[name], texts[name]) for name in ("text_encoder", "text_encoder_2")]
            dtype = parts["text_encoder"].dtype
            clip_states = torch.cat([o.hidden_states[layer].to(dtype) for o in outs], dim=-1)
            length = t5_length or FAMILY_PARTS["sd3"][2][3]
            if "text_encoder_3" in parts:
                t5_part = parts["text_encoder_3"]
                t5 = t5_states(t5_part, texts["text_encoder_3"], length).to(t5_part.dtype)
            else:  # diffusers' SD3 pipeline without T5: zeros in its place
                t5 = torch.zeros(len(texts["text_encoder"]), length, self.states_dim, dtype=dtype,
                                 device=clip_states.device)
            clip_states = torch.nn.functional.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1]))
            return {"encoder_hidden_states": torch.cat([clip_states, t5], dim=-2),
                    "text_embeds": torch.cat([o[0] for o in outs], dim=-1)}
        # flux: CLIP's pooled output, T5's states (both in the CLIP's dtype, as FluxPipeline casts them)
        clip = parts["text_encoder"]
        ids = clip.tokens(texts["text_encoder"]).input_ids.to(clip.device)
        pooled = clip.encoder(ids, output_hidden_states=False).pooler_output
        states = t5_states(parts["text_encoder_2"], texts["text_encoder_2"], t5_length)
        return {"encoder_hidden_states": states.to(clip.dtype), "text_embeds": pooled.to(clip.dtype)}


def _merge_lora(parts: dict, layers: dict, scale: float) -> None:
    from ..lora import merge, targets

    pairs = [pair for part, entries in layers.items() for pair in targets(entries, parts[part].encoder, part)]
    merge(pairs, scale)  # (the originals are the folders' files: nothing to keep)


def missing_parts(folder: str, family: str) -> list[str]:
    """The family's required encoder folders ``folder`` lacks."""
    return [enc for _, enc, needed, _ in FAMILY_PARTS[family] if needed and encoder_class_name(folder, enc) is None]


def width_problem(folder: str, family: str, spec) -> Optional[str]:
    """Why the folder's encoders cannot feed this network (their widths against its text inputs), or None."""
    def width(enc, key):
        config = encoder_config(folder, enc)
        return None if config is None else config.get(key)

    if family == "sd":
        found = {"text": width("text_encoder", "hidden_size")}
    elif family == "sdxl":
        found = {"text": sum(width(e, "hidden_size") or 0 for e in ("text_encoder", "text_encoder_2")),
                 "pooled": width("text_encoder_2", "projection_dim")}
    elif family == "sd3":
        found = {"pooled": sum(width(e, "projection_dim") or 0 for e in ("text_encoder", "text_encoder_2"))}
        if width("text_encoder_3", "d_model") is not None:
            found["text"] = width("text_encoder_3", "d_model")
    else:
        found = {"text": width("text_encoder_2", "d_model"), "pooled": width("text_encoder", "hidden_size")}
    want = {"text": spec.cross_attention_dim, "pooled": spec.text_embeds_dim}
    wrong = [f"{k} width {found[k]} (the network takes {want[k]})" for k in found if found[k] != want[k]]
    return f"{folder}'s {family} text encoders give " + ", ".join(wrong) if wrong else None


def find_prompt_encoder(folder: str, spec, zero_negative: Optional[bool] = None,
                        variant: Optional[str] = None) -> Optional[PromptEncoder]:
    """The PromptEncoder of a diffusers pipeline folder for its network: None where the network takes no text or
    the folder lacks the family's required encoders (``missing_parts``); CheckpointError where their widths do not
    fit the network. zero_negative None: SDXL's model_index.json says."""
    family = prompt_family(spec)
    if family is None or not os.path.isdir(folder) or missing_parts(folder, family):
        return None
    problem = width_problem(folder, family, spec)
    if problem:
        raise CheckpointError(problem)
    if zero_negative is None and family == "sdxl":  # StableDiffusionXLPipeline's default; the refiner says false
        from ..checkpoints.diffusers_folder import read_json

        index = os.path.join(folder, "model_index.json")
        config = read_json(index) if os.path.isfile(index) else {}
        zero_negative = bool(config.get("force_zeros_for_empty_prompt", True))
    return PromptEncoder(folder, family, spec.cross_attention_dim, zero_negative=bool(zero_negative), variant=variant)


def _slot_name(slot: int, negative: bool = False) -> str:
    return ("negative_" if negative else "") + ("prompt" if slot == 1 else f"prompt_{slot}")


def prompt_list(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadArgumentError(f"{name}: expected a string or a non-empty list of strings, found {prompt!r}")
    for i, text in enumerate(prompts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (json.loads('"\\ud800"') makes one): no tokenizer reads it
            where = "" if isinstance(prompt, str) else f"[{i}]"
            raise BadArgumentError(f"{name}{where}: expected text that UTF-8 can encode, found {text[e.start]!r} "
                                   f"(a lone surrogate) at character {e.start}") from None
    return prompts
