"""What a loaded model is, besides its weights: the facts a sampler needs and the fastdiff format stores.

A ``ModelSpec`` travels with every Pipeline; it is written into ``fastdiff.json`` by ``pipe.save`` and
into an ONNX file's metadata by the exporter, so any artifact can be sampled from again.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Optional

from .errors import UnsupportedConfigError
from .utils.strict_dict import check_field_types, known_fields

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "edm", "flow_prediction")
# diffusers schedulers of flow-matching networks (their configs carry no prediction_type: it is always velocity)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")


def is_flow_scheduler(config: Optional[dict]) -> bool:
    """A scheduler config of a flow-matching network: a FlowMatch class, or a solver with ``use_flow_sigmas``."""
    from .scheduler_keys import ignored_keys

    config = config or {}
    name = config.get("_class_name")
    # (a class without use_flow_sigmas ignores the key, as diffusers does: an Euler config carrying it is not flow)
    return name in FLOW_SCHEDULERS or (bool(config.get("use_flow_sigmas"))
                                       and "use_flow_sigmas" not in ignored_keys(str(name)))


# diffusers DDPMScheduler defaults: what a model folder without a scheduler was most likely trained with.
DEFAULT_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


@dataclass
class ModelSpec:
    """Sampling facts of a model.

    kind: "unet" | "dit" (native classes; see ``fastdiff.models.MODEL_KINDS``).
    model_config: the native config as a dict.
    prediction_type: what the network predicts on its discrete schedule ("epsilon" | "v_prediction" |
        "sample"), "edm" for an EDM-preconditioned network, or "flow_prediction" for a flow-matching (rectified
        flow) network predicting the velocity noise - x0 (``fastdiff.flow``).
    scheduler: a diffusers-style scheduler config (training betas + default sampler); honoured by
        ``generate`` when no sampler is named.
    in_channels / sample_size: the latent the sampler starts from (sample_size = (H, W)).
    learned_variance: the network outputs 2*C channels; the last C are variance values, split off.
    num_classes / null_class: class conditioning, and the label meaning "no class" for CFG (None when
        the model has no unconditional label).
    cross_attention_dim: text conditioning width (encoder_hidden_states), None when unconditional.
    text_embeds_dim / time_ids_dim: SDXL's micro-conditioning: the pooled text embedding's width and the
        number of time ids (6: original size, crop corner, target size; 5 for the refiner: original size, crop
        corner, aesthetic score); None for models without it.
    guidance_input: the network takes a distilled-guidance strength per sample (Flux dev's ``guidance``).
    guided_channels: CFG applies to the first K output channels only (official DiT: 3); None = all.
    inpainting: an inpainting network: beside its ``in_channels`` latents it takes the mask and the masked image's
        latents (``image_latents``; ``fastdiff.inpaint``): SD / SDXL inpainting UNets the mask at the latents' size,
        then the latents (1 + in_channels channels); FLUX.1 Fill (``kind == "flux"``) the latents, then the mask in
        pixels, each latent pixel's f x f mask pixels as channels (``image_latents_channels`` in all).
    low_res_channels: a super-resolution network (guided-diffusion's ``SuperResModel``: its 64 -> 256 and 128 -> 512
        upsamplers): beside its ``in_channels`` it takes a low-resolution image of that many channels in [-1, 1],
        upsampled bilinearly to the sample size (``image_latents``; ``generate(image=LOW_RES)``); diffusers' Stable
        Diffusion x4 upscaler: its image, at the latents' size; None otherwise.
    low_res_noise: an upscaler that noises its low-resolution image first (diffusers' ``StableDiffusionUpscalePipeline``:
        {"scheduler": its ``low_res_scheduler`` config, "max_noise_level": the pipeline's}): the image is noised to
        ``generate(noise_level=)`` by that DDPM schedule, and the level is the network's class label (both CFG
        passes'); None otherwise.
    """

    kind: str
    model_config: dict
    prediction_type: str = "epsilon"
    scheduler: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    in_channels: int = 3
    sample_size: tuple = (32, 32)
    learned_variance: bool = False
    num_classes: Optional[int] = None
    null_class: Optional[int] = None
    cross_attention_dim: Optional[int] = None
    text_embeds_dim: Optional[int] = None
    time_ids_dim: Optional[int] = None
    guidance_input: bool = False
    guided_channels: Optional[int] = None
    inpainting: bool = False
    low_res_channels: Optional[int] = None
    low_res_noise: Optional[dict] = None
    source: str = ""
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise UnsupportedConfigError("prediction_type", self.prediction_type, supported=list(PREDICTION_TYPES))
        s = self.sample_size
        if isinstance(s, bool) or not isinstance(s, (numbers.Real, list, tuple)) or isinstance(s, (list, tuple)) and (
                len(s) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in s)):
            raise UnsupportedConfigError("sample_size", s, supported="a size or a (height, width) pair",
                                         model="ModelSpec")
        self.sample_size = (int(s), int(s)) if isinstance(s, numbers.Real) else tuple(int(v) for v in s)
        check_field_types(self, "ModelSpec")  # (a damaged fastdiff.json: a list for a dict fails here, by name)

    @property
    def text_tokens(self) -> int:
        """The usual length of this model's text states: CLIP's 77 for UNets, SD3's 77 CLIP + 256 T5 tokens, Flux's
        512 T5 tokens (diffusers' pipeline defaults). Benchmarks and engine profiles use it."""
        return {"mmdit": 333, "flux": 512}.get(self.kind, 77)

    def default_scheduler_note(self) -> str:
        """What a checkpoint without a scheduler config is sampled with (the loaders' note)."""
        if self.kind == "mmdit":
            return "no scheduler config: SD3's FlowMatchEuler (shift 3) assumed"
        if self.kind == "flux" and self.guidance_input:
            return "no scheduler config: FLUX.1 dev's FlowMatchEuler with dynamic shifting assumed"
        if self.kind == "flux":
            return "no scheduler config: FLUX.1 schnell's FlowMatchEuler (shift 1) assumed"
        return "no scheduler config: assuming DDPM linear betas, epsilon prediction"

    @property
    def image_latents_channels(self) -> int:
        """An inpainting network's ``image_latents`` channels (see ``inpainting``), or a super-resolution network's
        low-resolution image's (``low_res_channels``)."""
        if self.low_res_channels:
            return self.low_res_channels
        if self.kind == "flux":  # FLUX.1 Fill: the transformer's packed input beyond the latents', unpacked
            c = self.model_config
            return c["in_channels"] // 4 - (c.get("out_channels") or c["in_channels"]) // 4
        return self.in_channels + 1

    @property
    def low_res_upscale(self) -> int:
        """Output pixels (latent pixels for the SD upscaler) per low-resolution image pixel by default: 4 for
        guided-diffusion's upsamplers (both released ones upsample 4x), 1 for an upscaler whose VAE upsamples."""
        return 1 if self.low_res_noise else 4

    @property
    def latent_control(self) -> bool:
        """FLUX.1 Depth / Canny: beside its latents the network takes its control image's VAE latents
        (``image_latents``, in_channels more channels), as FluxControlPipeline gives them."""
        return self.kind == "flux" and not self.inpainting and self.image_latents_channels == self.in_channels

    @property
    def label_bound(self) -> Optional[int]:
        """One past the largest class label the model takes (its null label included); None without a label
        table."""
        if not self.num_classes:
            return None
        return self.num_classes if self.null_class is None else max(self.num_classes, self.null_class + 1)

    def example_conditioning(self, batch: int, generator=None, tokens: Optional[int] = None) -> dict:
        """Random network keyword inputs for one call at ``batch`` (benchmarks and profiles; float32 on the CPU):
        class labels, text states, the pooled text embedding and SDXL's default time ids, as the model takes."""
        import torch

        kw = {}
        if self.num_classes:
            kw["class_labels"] = torch.arange(batch) % self.num_classes
        if self.cross_attention_dim:
            kw["encoder_hidden_states"] = torch.randn(batch, tokens or self.text_tokens, self.cross_attention_dim,
                                                      generator=generator)
        if self.text_embeds_dim:
            kw["text_embeds"] = torch.randn(batch, self.text_embeds_dim, generator=generator)
        if self.time_ids_dim:
            from .text_time import default_time_ids

            kw["time_ids"] = torch.tensor([default_time_ids(self.time_ids_dim, *self.sample_size)]).expand(batch, -1)
        if self.guidance_input:
            kw["guidance"] = torch.full((batch,), 3.5)
        # the mask and the masked image's latents (a super-resolution network's upsampled image), at the sample size
        if self.inpainting or self.latent_control or self.low_res_channels:
            kw["image_latents"] = torch.randn(batch, self.image_latents_channels, *self.sample_size,
                                              generator=generator)
        return kw

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sample_size"] = list(self.sample_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**known_fields(cls, d, model="ModelSpec", skip_private=False))
