"""``Pipeline.load_ip_adapter``: an image prompt for a text UNet, as diffusers' ``IPAdapterMixin`` (a mixin of
``fastdiff.pipeline.Pipeline``).

The adapter's weights go into the UNet (``fastdiff.models.ip_adapter``); the image is encoded by a CLIP vision model
with projection (transformers' ``CLIPVisionModelWithProjection``, from the adapter folder's ``image_encoder/``, as
diffusers loads it) after transformers' ``CLIPImageProcessor`` (diffusers' default ``feature_extractor``: the
encoder's image size). The unconditional pass of classifier-free guidance gets zero embeddings (diffusers'
``encode_image``; a black image's hidden states for IP-Adapter Plus and Full Face, which read hidden states). Face ID
reads a face embedding alone; Face ID Plus a face embedding and the face crop's hidden states
(``fastdiff.ip_faceid_plus_inputs``).

Several adapters load together (lists, as diffusers' ``load_ip_adapter``): every cross-attention adds each adapter's
scaled image attention; they share the first adapter's image encoder, and ``ip_adapter_image`` is then a list with
one image (or list of images) per adapter.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import BadArgumentError
from .ip_faceid_plus_inputs import FaceIDPlusInputs


class IPAdapterMixin(FaceIDPlusInputs):
    """What ``Pipeline`` needs: ``model``, ``spec``, ``config``, ``device``, ``_network_dtype()``,
    ``_rebuild_runner()``."""

    image_encoder = None
    _image_processor = None
    _black_states = None  # (encoder, its dtype / device / size, (S, E) states): IP-Adapter Plus's unconditional input
    _ip_image_scales = ()  # per adapter None or its per-image scales (weights of its masked images)
    _face_id_loras = frozenset()  # keys of the Face ID LoRAs merged into the network (each merged once)

    def load_ip_adapter(self, path, subfolder="", weight_name=None,
                        image_encoder_folder: Optional[str] = "image_encoder", *, scale=1.0,
                        faceid_shortcut: Optional[bool] = None, faceid_shortcut_scale: float = 1.0
                        ) -> "IPAdapterMixin":
        """Load IP-Adapters, as diffusers' ``load_ip_adapter(path, subfolder, weight_name, image_encoder_folder)``:
        ``path`` a folder (with ``subfolder`` / ``weight_name``: a .safetensors or .bin file), a file, or a loaded
        state dict; several adapters as lists (a list of one, or one value, repeated: ``load_ip_adapter(FOLDER,
        "models", ["ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.safetensors"])``). The image encoder is read
        from the first adapter's ``<path>/<subfolder>/<image_encoder_folder>`` (a folder name with a "/" is taken
        from ``path`` itself, as diffusers does; None: none, only ``ip_adapter_image_embeds=`` then) and serves every
        adapter; an encoder loaded before that makes what these adapters read stays (as diffusers keeps its
        registered one, a state dict or ``image_encoder_folder=None`` too).
        Replaces the adapters loaded before. The base IP-Adapter (ip-adapter_sd15, ip-adapter_sdxl, ...),
        IP-Adapter Plus (ip-adapter-plus_*: a resampler over the encoder's hidden states) and IP-Adapter Full Face
        (ip-adapter-full-face_sd15: an MLP over every hidden state), IP-Adapter Face ID (ip-adapter-faceid_*: a face
        embedding's MLP and a LoRA, merged) and Face ID Plus / Plus v2 (ip-adapter-faceid-plus_sd15,
        ip-adapter-faceid-plusv2_sd15 / _sdxl: a perceiver over the face crop's hidden states with the face
        embedding's tokens as queries, and the same LoRA; ``generate`` then takes both:
        ``fastdiff.ip_faceid_plus_inputs``) are read. ``scale``: as ``set_ip_adapter_scale``.
        faceid_shortcut / faceid_shortcut_scale: Face ID Plus v2's shortcut (out = ID tokens + scale * perceiver
        output; diffusers' ``image_projection_layers[i].shortcut`` / ``.shortcut_scale``, the original's ``shortcut=``
        / ``s_scale=``). Plus and Plus v2 files hold the same keys: None turns it on for a file whose name holds
        "plusv2" (h94's names) and leaves it off otherwise (a state dict: off, diffusers' default); True / False for
        every Face ID Plus adapter loaded."""
        from . import ip_adapter_files as files
        from .models import ip_adapter, ip_adapter_scales
        from .models.unet import UNet

        self._require_model("load_ip_adapter()")
        if self.spec.low_res_noise is not None:  # (diffusers' upscale pipeline has no image-prompt input either)
            raise BadArgumentError("load_ip_adapter(): an upscaler (StableDiffusionUpscalePipeline) takes no image "
                                   "prompt")
        if not isinstance(self.model, UNet) or not self.model.config.conditional:
            raise BadArgumentError(f"load_ip_adapter(): an IP-Adapter drives a text UNet's cross-attention, and this "
                                   f"model is a {self.spec.kind} {type(self.model).__name__}")
        if self.config is not None and self.config.backend == "tensorrt":  # (onnxruntime: exported again, below)
            raise BadArgumentError("load_ip_adapter(): this pipeline runs a TensorRT engine, which has no image-prompt "
                                   "input; use the onnxruntime / eager / triton / compile backends")
        sources = files.adapter_sources(path, subfolder, weight_name)
        scales, image_scales = files.scales_per_adapter(scale, len(sources))
        for s in scales:  # (a per-block dict that does not fit: before anything changes)
            ip_adapter_scales.check(self.model, s)
        states = [ip_adapter.split_state_dict(files.read_adapter_weights(*source)) for source in sources]
        # (the kinds and the widths, before an encoder is read)
        projections = [ip_adapter.check(self.model, state) for state in states]
        _set_shortcuts(projections, sources, faceid_shortcut, faceid_shortcut_scale)
        face_id_loras = self._face_id_loras_to_merge(states)
        first = sources[0]
        # the loaded encoder stays where it serves these adapters (diffusers keeps its registered one); else the
        # first adapter's folder's is read
        encoder, processor = self.image_encoder, self._image_processor
        fits = encoder is not None and all(_encoder_fits(encoder, p) for p in projections)
        wanted = not all(ip_adapter.is_face_id(p) for p in projections)  # (Face ID reads face embeddings alone)
        if not fits and wanted and image_encoder_folder is not None and not isinstance(first[0], dict):
            encoder, processor = files.image_encoder(first[0], first[1], image_encoder_folder, self.device,
                                                     self._network_dtype())
        for i, projection in enumerate(projections):
            _check_encoder(encoder, projection, i, len(projections))
        ip_adapter.attach(self.model, states, projections)
        ip_adapter.set_scale(self.model, scales)
        self._ip_image_scales = image_scales
        self._merge_face_id_loras(face_id_loras)
        self.image_encoder, self._image_processor = encoder, processor
        self._rebuild_runner()  # (compiled models and captured graphs ran the network without the branches)
        return self

    def _face_id_loras_to_merge(self, states: list) -> list:
        """[(key, pairs)] of the Face ID LoRAs of ``states`` not merged yet (``fastdiff.models.ip_faceid``), checked
        before anything changes. A new one while another Face ID's LoRA stays merged is refused (that one leaves the
        weights only with ``unload_lora``; diffusers then keeps one LoRA of its own choosing)."""
        from .models.ip_faceid import lora_pairs
        from .utils.keys import freeze

        wanted = []
        for state in states:
            pairs = lora_pairs(self.model, state["ip_adapter"])
            if pairs:
                wanted.append((freeze([(layer.down, layer.up) for _, layer in pairs]), pairs))
        # (one adapter listed twice merges its LoRA once)
        todo = list({key: pairs for key, pairs in wanted if key not in self._face_id_loras}.items())
        if todo and set(self._face_id_loras) - {key for key, _ in wanted}:
            raise BadArgumentError("load_ip_adapter(): another IP-Adapter Face ID's LoRA is merged into the weights; "
                                   "unload_lora() first (it removes every merged LoRA), then load these adapters")
        return todo

    def _merge_face_id_loras(self, todo: list) -> None:
        """Merge them as ``load_lora(scale=1)`` would (diffusers: a PEFT adapter at weight 1), kept for
        ``unload_lora``; several adapters' LoRAs add up (diffusers keeps the last one active)."""
        from .lora import merge

        for key, pairs in todo:
            merge(pairs, 1.0, self._lora_saved)
        self._face_id_loras = frozenset(self._face_id_loras | {key for key, _ in todo})

    def set_ip_adapter_scale(self, scale) -> None:
        """The image prompt's weight, as diffusers' ``set_ip_adapter_scale``: a number, or InstantStyle's per-block
        dict (``{"up": {"block_0": [0.0, 1.0, 0.0]}}``: the image prompt in those attention layers alone, 0 in the
        others; the grammar in ``fastdiff.models.ip_adapter_scales``); with several adapters a list of one per
        adapter (one value serves them all); an adapter's list of numbers is one scale per masked image
        (``generate(ip_adapter_masks=)``, diffusers' ``[[0.7, 0.5]]``). A buffer every layer reads, changed in
        place: captured graphs and compiled models take it as it is."""
        from .ip_adapter_files import scales_per_adapter
        from .models import ip_adapter

        if self.model is None or not ip_adapter.attached(self.model):
            raise BadArgumentError("set_ip_adapter_scale(): no IP-Adapter is loaded (pipe.load_ip_adapter)")
        scales, image_scales = scales_per_adapter(scale, ip_adapter.adapter_count(self.model))
        ip_adapter.set_scale(self.model, scales)  # (checks every dict first: a refused call changes nothing)
        self._ip_image_scales = image_scales

    def unload_ip_adapter(self) -> None:
        """Remove the adapter and its image encoder (diffusers' ``unload_ip_adapter``)."""
        from .models import ip_adapter

        if self.model is not None and ip_adapter.attached(self.model):
            ip_adapter.detach(self.model)
            self.image_encoder = self._image_processor = self._black_states = None
            self._ip_image_scales = ()
            self._rebuild_runner()

    def _ip_adapter_embeds(self, image, embeds, b: int, guided: bool, clip_embeds=None) -> Optional[tuple]:
        """generate(ip_adapter_image= / ip_adapter_image_embeds= / ip_adapter_clip_embeds=) as (b, N, ...) CLIP image
        features and those of the unconditional pass (as diffusers' encode_image: zeros, Plus a black image's states;
        diffusers' list form brings its own), or None; with several adapters, tuples of those, one per adapter. With
        a Face ID Plus adapter loaded: ``fastdiff.ip_faceid_plus_inputs``."""
        from .models import ip_adapter

        count = ip_adapter.adapter_count(self.model) if self.model is not None else 0
        if count and any(ip_adapter.is_face_id_plus(p) for p in self.model.ip_projection):
            return self._face_id_plus_features(image, embeds, clip_embeds, b, guided)
        if clip_embeds is not None:
            raise BadArgumentError("ip_adapter_clip_embeds: the CLIP hidden states of IP-Adapter Face ID Plus's face "
                                   "crop, and no Face ID Plus adapter is loaded")
        if image is None and embeds is None:
            if count:
                raise BadArgumentError("ip_adapter_image: an IP-Adapter is loaded: expected an image (or "
                                       "ip_adapter_image_embeds), found none; unload_ip_adapter() to run without")
            return None
        if not count:
            raise BadArgumentError("ip_adapter_image: given, but no IP-Adapter is loaded (pipe.load_ip_adapter)")
        if image is not None and embeds is not None:
            raise BadArgumentError("ip_adapter_image and ip_adapter_image_embeds: expected one of them, found both")
        if image is not None:  # (1, N, ...): every sample's
            pairs = [tuple(e[None] for e in self._encode_ip_image(one, i))
                     for i, one in enumerate(_per_adapter(image, count))]
        else:
            pairs = self._given_embeds(embeds, count, guided)
        return self._per_adapter_result([self._with_negative(i, positive, negative, b, guided)
                                    for i, (positive, negative) in enumerate(pairs)])

    def _given_embeds(self, embeds, count: int, guided: bool) -> list:
        """[(positive, negative or None)] per adapter of ip_adapter_image_embeds: one tensor (one adapter), or
        diffusers' form, one tensor per adapter, [negative; positive] under guidance."""
        if not isinstance(embeds, (list, tuple)):
            if count > 1:
                raise BadArgumentError(f"ip_adapter_image_embeds: {count} IP-Adapters are loaded: expected a list of "
                                       f"{count} tensors (diffusers' form), found one tensor")
            return [(self._embeds_tensor(embeds, 0), None)]
        if len(embeds) != count:
            loaded = "one IP-Adapter is" if count == 1 else f"{count} IP-Adapters are"
            raise BadArgumentError(f"ip_adapter_image_embeds: {loaded} loaded: expected a list of {count} "
                                   f"tensor{'s' if count > 1 else ''} (diffusers' form), found {len(embeds)}")
        return [self._listed_embeds(e, i, guided) for i, e in enumerate(embeds)]

    def ip_adapter_embeds_list(self, positives: list, guided: bool) -> list:
        """diffusers' list form of ``ip_adapter_image_embeds`` (one tensor per loaded adapter) from each adapter's
        image features alone ((B or 1, N, D), Plus / Full Face (B or 1, N, S, E)): under guidance each becomes
        [negative; positive], the negative what generate() makes for an image prompt (zeros; Plus / Full Face a black
        image's hidden states); without it the features as they are. (One tensor for one adapter needs none of this:
        generate() takes the features alone there. The command line's --ip-adapter-embeds, once per adapter.)"""
        from .models.ip_adapter import adapter_count, image_rank

        count = adapter_count(self.model) if self.model is not None else 0
        if len(positives) != count:
            raise BadArgumentError(f"ip_adapter_image_embeds: {count} IP-Adapter(s) loaded: expected the features of "
                                   f"each, found {len(positives)}")
        out = []
        for i, given in enumerate(positives):
            embeds = self._embeds_tensor(given, i)
            if guided and image_rank(self.model, i) == 2 and self.image_encoder is None:
                raise BadArgumentError(f"ip_adapter_image_embeds{_which(i, self.model)}: the unconditional pass of an "
                                       f"IP-Adapter Plus / Full Face reads a black image's encoding, and no image "
                                       f"encoder is loaded: load one (load_ip_adapter(..., image_encoder_folder=); "
                                       f"the command line's --ip-adapter-encoder FOLDER), or give diffusers' list form "
                                       f"with the negatives in it")
            if guided:
                embeds, negative = self._with_negative(i, embeds, None, embeds.shape[0], True)
                embeds = torch.cat([negative, embeds])
            out.append(embeds)
        return out

    def _ip_adapter_masks(self, masks, embeds, b: int, latent_size: tuple) -> Optional[tuple]:
        """generate(ip_adapter_masks=) for the image prompt's features ``embeds`` (a tensor, or one per adapter):
        per adapter None or (b, N, H, W) masks (``fastdiff.ip_adapter_masks``), or None."""
        from .ip_adapter_masks import VAE_GRID, prepare_masks
        from .models.ip_adapter import attention_sizes

        features = list(embeds) if isinstance(embeds, tuple) else [embeds]
        f = self.vae.downscale if self.vae is not None else VAE_GRID
        return prepare_masks(masks, [e.shape[1] for e in features], b, (f * latent_size[0], f * latent_size[1]),
                             attention_sizes(self.model, *latent_size), self.device, self._ip_image_scales)

    def _listed_embeds(self, given, adapter: int, guided: bool) -> tuple:
        """(positive, negative or None) of one adapter's tensor in diffusers' list form."""
        from .models.ip_adapter import image_rank

        embeds = self._embeds_tensor(given, adapter)
        if not guided:
            return embeds, None
        rank = image_rank(self.model, adapter)
        if embeds.shape[0] % 2 or given.dim() != rank + 2:  # (diffusers: 3-d / 4-d tensors there)
            shape = "(2B, N, D)" if rank == 1 else "(2B, N, S, E)"
            raise BadArgumentError(f"ip_adapter_image_embeds: with guidance diffusers' form stacks the negative and "
                                   f"positive features: expected {shape}, found {tuple(given.shape)}")
        negative, embeds = embeds.chunk(2)
        return embeds, negative

    def _with_negative(self, adapter: int, embeds, negative, b: int, guided: bool) -> tuple:
        """One adapter's (b, N, ...) features and the unconditional pass's: given, a black image's states (Plus,
        guided), or zeros."""
        from .models.ip_adapter import image_rank

        embeds = self._per_sample(embeds, b, adapter)
        if negative is not None:
            return embeds, self._per_sample(negative, b, adapter)
        if image_rank(self.model, adapter) == 2 and guided:  # Plus / Full Face: a black image's states
            return embeds, self._black_image_states().expand_as(embeds)
        return embeds, torch.zeros_like(embeds)

    def _embeds_tensor(self, embeds, adapter: int) -> torch.Tensor:
        """ip_adapter_image_embeds as a (B or 1, N, D) float tensor ((B or 1, N, S, E) for Plus), finite; the
        sample and image axes may be left out."""
        from .models.ip_adapter import image_rank

        rank = image_rank(self.model, adapter)
        shapes = "(D,), (N, D) or (B, N, D)" if rank == 1 else "(S, E), (N, S, E) or (B, N, S, E) (Plus, Full Face)"
        if not torch.is_tensor(embeds) or not rank <= embeds.dim() <= rank + 2 or not embeds.is_floating_point():
            raise BadArgumentError(f"ip_adapter_image_embeds: expected a float tensor {shapes} of CLIP image "
                                   f"features{_which(adapter, self.model)}, found "
                                   f"{tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__}")
        if not torch.isfinite(embeds).all():
            raise BadArgumentError("ip_adapter_image_embeds: expected finite values, found NaN or inf")
        return embeds.reshape((1,) * (rank + 2 - embeds.dim()) + tuple(embeds.shape))

    def _per_sample(self, embeds: torch.Tensor, b: int, adapter: int) -> torch.Tensor:
        """(B or 1, N, ...) image features as (b, N, ...) float32 on the pipeline's device, their width checked."""
        from .models.ip_adapter import image_width

        width = image_width(self.model, adapter)
        if embeds.shape[0] not in (1, b) or embeds.shape[1] == 0 or embeds.shape[-1] != width:
            raise BadArgumentError(f"ip_adapter_image_embeds: expected (1 or {b} samples, N >= 1 images, ..., "
                                   f"{width}) CLIP image features{_which(adapter, self.model)}, found "
                                   f"{tuple(embeds.shape)}")
        return embeds.to(self.device, torch.float32).expand(b, *embeds.shape[1:])

    @torch.no_grad()
    def _black_image_states(self) -> torch.Tensor:
        """(S, E) penultimate hidden states of a black image: IP-Adapter Plus's unconditional input (diffusers'
        encode_image encodes zeros like the image)."""
        if self.image_encoder is None:
            raise BadArgumentError("ip_adapter_image_embeds: IP-Adapter Plus's (and Face ID Plus's) unconditional "
                                   "pass reads a black image's encoding, and no image encoder is loaded; pass "
                                   "diffusers' form [negative; positive] (a list of one tensor) or ip_adapter_image=")
        param = next(self.image_encoder.parameters())
        size = self.image_encoder.config.image_size
        # one encoder pass per encoder, dtype and device, not one per generate call (the key changes when optimize()
        # casts the encoder, or another adapter's encoder loads)
        key = (param.dtype, param.device, size, self.device)
        cached = self._black_states  # (encoder, key, states)
        if cached is not None and cached[0] is self.image_encoder and cached[1] == key:
            return cached[2]
        black = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
        states = self.image_encoder(black, output_hidden_states=True).hidden_states[-2][0].float().to(self.device)
        self._black_states = (self.image_encoder, key, states)
        return states

    @torch.no_grad()
    def _encode_ip_image(self, image, adapter: int = 0) -> tuple:
        """(N, D) image embeddings of one image or a list of them (diffusers: their tokens are concatenated), and
        the unconditional pass's: zeros; for an IP-Adapter Plus, Full Face or Face ID Plus (its face crops), (N, S, E)
        penultimate hidden states and those of a black image (diffusers' encode_image with output_hidden_states)."""
        from .models.ip_adapter import is_face_id

        if is_face_id(self.model.ip_projection[adapter]):
            raise BadArgumentError("ip_adapter_image: IP-Adapter Face ID reads a face-recognition embedding "
                                   "(insightface's, as diffusers' Face ID pipelines): expected ip_adapter_image_embeds")
        if self.image_encoder is None:
            raise BadArgumentError("ip_adapter_image: the IP-Adapter was loaded without an image encoder "
                                   "(image_encoder_folder=None, or from a state dict); pass ip_adapter_image_embeds=")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise BadArgumentError("ip_adapter_image: expected an image or a list of images, found an empty list")
        tensors = [torch.is_tensor(i) for i in images]
        if all(tensors):  # preprocessed pixels, as diffusers hands tensors to the encoder
            pixels = torch.cat([i if i.dim() == 4 else i[None] for i in images])
            if pixels.dim() != 4 or pixels.shape[0] == 0:
                raise BadArgumentError(f"ip_adapter_image: expected (3, H, W) or (N, 3, H, W) pixel tensors, found "
                                       f"{tuple(pixels.shape)}")
        elif any(tensors):
            raise BadArgumentError("ip_adapter_image: expected images or pixel tensors, found a list of both")
        else:
            pixels = self._image_processor(images, return_tensors="pt").pixel_values
        from .models.ip_adapter import reads_hidden_states

        encoder = self.image_encoder
        param = next(encoder.parameters())
        pixels = pixels.to(param.device, param.dtype)
        if reads_hidden_states(self.model.ip_projection[adapter]):  # Plus / Full Face / Face ID Plus: hidden states
            def states(p):
                return encoder(p, output_hidden_states=True).hidden_states[-2].float()  # (N, S, E)
            return states(pixels), states(torch.zeros_like(pixels))
        embeds = encoder(pixels).image_embeds.float()  # (N, D)
        return embeds, torch.zeros_like(embeds)


def _set_shortcuts(projections: list, sources: list, shortcut: Optional[bool], scale: float) -> None:
    """Every Face ID Plus projection's shortcut (``load_ip_adapter``'s faceid_shortcut rule)."""
    import os

    from .ip_adapter_files import adapter_file
    from .models.ip_adapter import is_face_id_plus
    from .utils.checks import finite_number

    plus = [(p, source) for p, source in zip(projections, sources) if is_face_id_plus(p)]
    if not plus and (shortcut is not None or scale != 1.0):
        raise BadArgumentError("load_ip_adapter(): faceid_shortcut / faceid_shortcut_scale: given, and none of these "
                               "adapters is IP-Adapter Face ID Plus")
    scale = finite_number("faceid_shortcut_scale", scale)
    for projection, (path, subfolder, weight_name) in plus:
        # (the file's own name: a folder's one weight file too)
        name = os.path.basename(adapter_file(path, subfolder, weight_name)) if isinstance(path, (str, os.PathLike)) \
            else ""
        on = "plusv2" in name.lower() if shortcut is None else bool(shortcut)
        if not on and scale != 1.0:  # (a scale the adapter would never use)
            raise BadArgumentError(f"load_ip_adapter(): faceid_shortcut_scale={scale} with the shortcut off (file "
                                   f"{name or 'a state dict'!r}: no 'plusv2' in its name); expected "
                                   f"faceid_shortcut=True beside it")
        projection.set_shortcut(on, scale)


def _per_adapter(image, count: int) -> list:
    """ip_adapter_image as one entry (an image or a list of images) per adapter: for one adapter the image, a list
    of images, or diffusers' list of one list; for several, diffusers' list of one entry per adapter."""
    if count == 1:
        nested = isinstance(image, (list, tuple)) and len(image) == 1 and isinstance(image[0], (list, tuple))
        return [image[0] if nested else image]
    if not isinstance(image, (list, tuple)) or len(image) != count:
        found = f"a list of {len(image)}" if isinstance(image, (list, tuple)) else "one image"
        raise BadArgumentError(f"ip_adapter_image: {count} IP-Adapters are loaded: expected a list of {count} (an "
                               f"image or a list of images for each adapter, diffusers' form), found {found}")
    return list(image)


def _which(adapter: int, unet) -> str:
    from .models.ip_adapter import adapter_count

    return f" for IP-Adapter {adapter}" if adapter_count(unet) > 1 else ""


def _encoder_output(encoder, projection) -> Optional[tuple]:
    """(width the encoder makes, width the adapter reads, whether those are hidden states) where they differ, else
    None: the base adapter reads projected embeddings, Plus / Full Face / Face ID Plus hidden states; Face ID no
    encoder output."""
    from .models import ip_adapter

    if ip_adapter.is_face_id(projection):
        return None
    plus = ip_adapter.reads_hidden_states(projection)
    made = encoder.config.hidden_size if plus else encoder.config.projection_dim
    face_plus = ip_adapter.is_face_id_plus(projection)  # (its hidden states beside the face embedding)
    width = projection.clip_dim if face_plus else ip_adapter.projection_sizes(projection)[0]
    return None if made == width else (made, width, plus)


def _encoder_fits(encoder, projection) -> bool:
    return _encoder_output(encoder, projection) is None


def _check_encoder(encoder, projection, adapter: int, count: int) -> None:
    """A clear error where the encoder does not make what the adapter reads (another adapter's encoder; several
    adapters share one)."""
    mismatch = None if encoder is None else _encoder_output(encoder, projection)
    if mismatch is None:
        return
    made, width, plus = mismatch
    which = f"adapter {adapter} projects" if count > 1 else "the adapter projects"
    shared = " (several adapters share the first one's encoder, as in diffusers)" if count > 1 else ""
    raise BadArgumentError(f"load_ip_adapter(): the image encoder makes {made}-wide "
                           f"{'hidden states' if plus else 'embeddings'} and {which} {width}-wide ones "
                           f"(another adapter's encoder){shared}; pass its image_encoder_folder=, or "
                           f"unload_ip_adapter() first")
