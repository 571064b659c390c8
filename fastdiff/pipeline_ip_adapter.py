"""``Pipeline.load_ip_adapter``: an image prompt for a text UNet, as diffusers' ``IPAdapterMixin`` (a mixin of
``fastdiff.pipeline.Pipeline``).

The adapter's weights go into the UNet (``fastdiff.models.ip_adapter``); the image is encoded by a CLIP vision model
with projection (transformers' ``CLIPVisionModelWithProjection``, from the adapter folder's ``image_encoder/``, as
diffusers loads it) after transformers' ``CLIPImageProcessor`` (diffusers' default ``feature_extractor``: the
encoder's image size). The unconditional pass of classifier-free guidance gets zero embeddings (diffusers'
``encode_image``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import BadArgumentError
from .utils.checks import finite_number


class IPAdapterMixin:
    """What ``Pipeline`` needs: ``model``, ``spec``, ``config``, ``device``, ``_network_dtype()``,
    ``_rebuild_runner()``."""

    image_encoder = None
    _image_processor = None
    _black_states = None  # (encoder, its dtype / device / size, (S, E) states): IP-Adapter Plus's unconditional input

    def load_ip_adapter(self, path, subfolder: str = "", weight_name: Optional[str] = None,
                        image_encoder_folder: Optional[str] = "image_encoder", *,
                        scale=1.0) -> "IPAdapterMixin":
        """Load an IP-Adapter, as diffusers' ``load_ip_adapter(path, subfolder, weight_name, image_encoder_folder)``:
        ``path`` a folder (with ``subfolder`` / ``weight_name``: a .safetensors or .bin file), a file, or a loaded
        state dict; its image encoder from ``<path>/<subfolder>/<image_encoder_folder>`` (a folder name with a "/"
        is taken from ``path`` itself, as diffusers does; None: no encoder, only ``ip_adapter_image_embeds=`` then;
        a state dict keeps the encoder loaded before, as diffusers keeps its registered one). Replaces an adapter
        loaded before. The base IP-Adapter (ip-adapter_sd15, ip-adapter_sdxl, ...) and IP-Adapter Plus
        (ip-adapter-plus_*: a resampler over the encoder's hidden states) are read."""
        from .models import ip_adapter, ip_adapter_scales
        from .models.unet import UNet

        self._require_model("load_ip_adapter()")
        if self.spec.low_res_noise is not None:  # (diffusers' upscale pipeline has no image-prompt input either)
            raise BadArgumentError("load_ip_adapter(): an upscaler (StableDiffusionUpscalePipeline) takes no image "
                                   "prompt")
        if not isinstance(self.model, UNet) or not self.model.config.conditional:
            raise BadArgumentError(f"load_ip_adapter(): an IP-Adapter drives a text UNet's cross-attention, and this "
                                   f"model is a {self.spec.kind} {type(self.model).__name__}")
        if self.config is not None and self.config.backend in ("onnxruntime", "tensorrt"):
            raise BadArgumentError(f"load_ip_adapter(): this pipeline runs an exported {self.config.backend} graph, "
                                   f"which has no image-prompt input; use the eager / triton / compile backends")
        scale = _scale(scale)
        ip_adapter_scales.check(self.model, scale)  # (a per-block dict that does not fit: before anything changes)
        state = ip_adapter.split_state_dict(_read_weights(path, subfolder, weight_name))
        projection = ip_adapter.check(self.model, state)  # (the kind and the widths, before an encoder is read)
        width = ip_adapter.projection_sizes(projection)[0]
        encoder, processor = None, None
        if isinstance(path, dict):
            encoder, processor = self.image_encoder, self._image_processor
        elif image_encoder_folder is not None:
            encoder, processor = _image_encoder(path, subfolder, image_encoder_folder, self.device,
                                                self._network_dtype())
        plus = not isinstance(projection, ip_adapter.ImageProjection)  # (Plus reads hidden states, not embeds)
        made = None if encoder is None else encoder.config.hidden_size if plus else encoder.config.projection_dim
        if made is not None and made != width:
            raise BadArgumentError(f"load_ip_adapter(): the image encoder makes {made}-wide "
                                   f"{'hidden states' if plus else 'embeddings'} and the adapter projects {width}-wide "
                                   f"ones (another adapter's encoder)")
        ip_adapter.attach(self.model, state, projection)
        ip_adapter.set_scale(self.model, scale)
        self.image_encoder, self._image_processor = encoder, processor
        self._rebuild_runner()  # (compiled models and captured graphs ran the network without the branch)
        return self

    def set_ip_adapter_scale(self, scale) -> None:
        """The image prompt's weight, as diffusers' ``set_ip_adapter_scale``: a number, or InstantStyle's per-block
        dict (``{"up": {"block_0": [0.0, 1.0, 0.0]}}``: the image prompt in those attention layers alone, 0 in the
        others; the grammar in ``fastdiff.models.ip_adapter_scales``), or a list of one of them for the one adapter.
        A buffer every layer reads, changed in place: captured graphs and compiled models take it as it is."""
        from .models import ip_adapter

        if self.model is None or not ip_adapter.attached(self.model):
            raise BadArgumentError("set_ip_adapter_scale(): no IP-Adapter is loaded (pipe.load_ip_adapter)")
        ip_adapter.set_scale(self.model, _scale(scale))

    def unload_ip_adapter(self) -> None:
        """Remove the adapter and its image encoder (diffusers' ``unload_ip_adapter``)."""
        from .models import ip_adapter

        if self.model is not None and ip_adapter.attached(self.model):
            ip_adapter.detach(self.model)
            self.image_encoder = self._image_processor = self._black_states = None
            self._rebuild_runner()

    def _ip_adapter_embeds(self, image, embeds, b: int, guided: bool) -> Optional[tuple]:
        """generate(ip_adapter_image= / ip_adapter_image_embeds=) as (b, N, ...) CLIP image features and those of the
        unconditional pass (as diffusers' encode_image: zeros, Plus a black image's states; diffusers' list form
        brings its own), or None."""
        from .models import ip_adapter

        loaded = self.model is not None and ip_adapter.attached(self.model)
        if image is None and embeds is None:
            if loaded:
                raise BadArgumentError("ip_adapter_image: an IP-Adapter is loaded: expected an image (or "
                                       "ip_adapter_image_embeds), found none; unload_ip_adapter() to run without")
            return None
        if not loaded:
            raise BadArgumentError("ip_adapter_image: given, but no IP-Adapter is loaded (pipe.load_ip_adapter)")
        if image is not None and embeds is not None:
            raise BadArgumentError("ip_adapter_image and ip_adapter_image_embeds: expected one of them, found both")
        negative = None
        if image is not None:
            embeds, negative = (e[None] for e in self._encode_ip_image(image))  # (1, N, ...): every sample's
        elif not isinstance(embeds, (list, tuple)):
            embeds = self._embeds_tensor(embeds)
        else:  # diffusers' form: one tensor per adapter, [negative, positive]
            if len(embeds) != 1:
                raise BadArgumentError(f"ip_adapter_image_embeds: one IP-Adapter is loaded: expected a list of one "
                                       f"tensor (diffusers' form), found {len(embeds)}")
            embeds_given = embeds[0]
            embeds = self._embeds_tensor(embeds_given)
            if guided:
                if embeds.shape[0] % 2:
                    shape = "(2B, N, D)" if ip_adapter.image_rank(self.model) == 1 else "(2B, N, S, E)"
                    raise BadArgumentError(f"ip_adapter_image_embeds: with guidance diffusers' form stacks the "
                                           f"negative and positive features: expected {shape}, found "
                                           f"{tuple(embeds_given.shape)}")
                negative, embeds = embeds.chunk(2)
        embeds = self._per_sample(embeds, b)
        if negative is not None:
            negative = self._per_sample(negative, b)
        elif ip_adapter.image_rank(self.model) == 2 and guided:  # Plus: a black image's states, as encode_image
            negative = self._black_image_states().expand_as(embeds)
        else:
            negative = torch.zeros_like(embeds)
        return embeds, negative

    def _embeds_tensor(self, embeds) -> torch.Tensor:
        """ip_adapter_image_embeds as a (B or 1, N, D) float tensor ((B or 1, N, S, E) for Plus), finite; the
        sample and image axes may be left out."""
        from .models.ip_adapter import image_rank

        rank = image_rank(self.model)
        shapes = "(D,), (N, D) or (B, N, D)" if rank == 1 else "(S, E), (N, S, E) or (B, N, S, E) (Plus)"
        if not torch.is_tensor(embeds) or not rank <= embeds.dim() <= rank + 2 or not embeds.is_floating_point():
            raise BadArgumentError(f"ip_adapter_image_embeds: expected a float tensor {shapes} of CLIP image "
                                   f"features, found "
                                   f"{tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__}")
        if not torch.isfinite(embeds).all():
            raise BadArgumentError("ip_adapter_image_embeds: expected finite values, found NaN or inf")
        return embeds.reshape((1,) * (rank + 2 - embeds.dim()) + tuple(embeds.shape))

    def _per_sample(self, embeds: torch.Tensor, b: int) -> torch.Tensor:
        """(B or 1, N, ...) image features as (b, N, ...) float32 on the pipeline's device, their width checked."""
        from .models.ip_adapter import image_width

        width = image_width(self.model)
        if embeds.shape[0] not in (1, b) or embeds.shape[1] == 0 or embeds.shape[-1] != width:
            raise BadArgumentError(f"ip_adapter_image_embeds: expected (1 or {b} samples, N >= 1 images, ..., "
                                   f"{width}) CLIP image features, found {tuple(embeds.shape)}")
        return embeds.to(self.device, torch.float32).expand(b, *embeds.shape[1:])

    @torch.no_grad()
    def _black_image_states(self) -> torch.Tensor:
        """(S, E) penultimate hidden states of a black image: IP-Adapter Plus's unconditional input (diffusers'
        encode_image encodes zeros like the image)."""
        if self.image_encoder is None:
            raise BadArgumentError("ip_adapter_image_embeds: IP-Adapter Plus's unconditional pass reads a black "
                                   "image's encoding, and no image encoder is loaded; pass diffusers' form "
                                   "[negative; positive] (a list of one tensor) or ip_adapter_image=")
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
    def _encode_ip_image(self, image) -> tuple:
        """(N, D) image embeddings of one image or a list of them (diffusers: their tokens are concatenated), and
        the unconditional pass's: zeros; for Plus, (N, S, E) penultimate hidden states and those of a black image
        (diffusers' encode_image with output_hidden_states)."""
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
        from .models.ip_adapter import image_rank

        encoder = self.image_encoder
        param = next(encoder.parameters())
        pixels = pixels.to(param.device, param.dtype)
        if image_rank(self.model) == 2:  # Plus
            def states(p):
                return encoder(p, output_hidden_states=True).hidden_states[-2].float()  # (N, S, E)
            return states(pixels), states(torch.zeros_like(pixels))
        embeds = encoder(pixels).image_embeds.float()  # (N, D)
        return embeds, torch.zeros_like(embeds)


def _scale(scale):
    """diffusers' scale of one adapter: a number or InstantStyle's per-block dict, or a list of one of them (checked
    against the UNet when it is set: ``fastdiff.models.ip_adapter_scales``)."""
    if isinstance(scale, (list, tuple)):
        if len(scale) != 1:
            raise BadArgumentError(f"scale: one IP-Adapter is loaded: expected a number, a per-block dict or a list "
                                   f"of one, found {len(scale)} values")
        scale = scale[0]
    return scale if isinstance(scale, dict) else finite_number("scale", scale)


def _read_weights(path, subfolder: str, weight_name: Optional[str]) -> dict:
    """The adapter's state dict from a state dict, a file or a folder (safetensors read first; .bin files with
    ``torch.load(weights_only=True)``: no pickle code runs)."""
    from .checkpoints.io import read_weights

    if isinstance(path, dict):
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise BadArgumentError(f"load_ip_adapter(): expected a path or a state dict, found {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder)
        if weight_name is None:
            names = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin"))) \
                if os.path.isdir(folder) else []
            if len(names) != 1:
                raise BadArgumentError(f"load_ip_adapter(): expected weight_name= (the adapter file in {folder}), "
                                       f"found {names or 'no weight files'}")
            weight_name = names[0]
        path = os.path.join(folder, weight_name)
    if not os.path.isfile(path):
        raise BadArgumentError(f"load_ip_adapter(): expected an IP-Adapter file, found no file at {path!r}")
    return read_weights(path)


def _image_encoder(path, subfolder: str, folder: str, device, dtype):
    """(transformers' CLIPVisionModelWithProjection, a CLIPImageProcessor at its image size), from diffusers'
    place for them."""
    try:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    except ImportError as e:  # pragma: no cover - transformers comes with the text extra
        raise BadArgumentError("load_ip_adapter(): the image encoder needs transformers (pip install "
                               "'fastdiff[text]')") from e
    base = os.path.dirname(path) if os.path.isfile(path) else path
    where = os.path.join(base, subfolder, folder) if "/" not in folder else os.path.join(base, folder)
    if not os.path.isdir(where):
        raise BadArgumentError(f"load_ip_adapter(): expected the image encoder (a CLIPVisionModelWithProjection "
                               f"folder) at {where!r}, found none; pass image_encoder_folder= (or None, then "
                               f"ip_adapter_image_embeds=)")
    encoder = CLIPVisionModelWithProjection.from_pretrained(where, use_safetensors=None).to(device, dtype).eval()
    size = encoder.config.image_size
    return encoder, CLIPImageProcessor(size=size, crop_size=size)
