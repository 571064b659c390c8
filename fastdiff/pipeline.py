"""The Pipeline: a native network + its ModelSpec, and everything a user does with them.

``fastdiff.load`` returns one. ``generate`` samples; ``optimize`` picks the runner (eager, fused
kernels, torch.compile, CUDA graphs, ONNX Runtime, TensorRT); ``save`` writes the fastdiff format.
"""

from __future__ import annotations

import dataclasses
import numbers
import random
import warnings
from typing import Optional, Sequence, Union

import torch

from .classifier_guidance import classifier_guided
from .errors import BadArgumentError, UnsupportedConfigError
from .pipeline_classifier import ClassifierMixin
from .pipeline_control import ControlNetMixin
from .pipeline_images import ImageInputsMixin
from .pipeline_ip_adapter import IPAdapterMixin
from .pipeline_plans import PlansMixin
from .prompts.encoder import EXTRA_PROMPTS
from .spec import ModelSpec
from .state_update import update_impl
from .text_time import guidance_conditioning, text_time_conditioning
from .utils.checks import finite_host_values, finite_number, integer_labels, one_or
from .utils.keys import freeze
from .utils.trees import map_tensors

OUTPUT_TYPES = ("tensor", "np", "pil")
# the conditioning entry that carries a regular model's inpainting (``_sample_plan``); never a network input
KNOWN_REGION = "known_region"


class Pipeline(PlansMixin, ControlNetMixin, ImageInputsMixin, IPAdapterMixin, ClassifierMixin):
    def __init__(self, model: Optional[torch.nn.Module], spec: ModelSpec, device="cpu", runner=None, vae=None,
                 prompt_encoder=None):
        """model: the native network (None for an artifact-only pipeline, e.g. a loaded .onnx file, whose
        ``runner`` is then required). vae: a latent model's image decoder (``fastdiff.models.vae.VAEDecoder``).
        prompt_encoder: a ``fastdiff.prompts.PromptEncoder`` (the folder's tokenizers and text encoders)."""
        if model is None and runner is None:
            raise BadArgumentError("Pipeline needs a model or a runner, found neither")
        # (a network with conditioning channels beside its latents, InstructPix2Pix's 8 or depth2img's 5, samples
        # its output's)
        out = getattr(getattr(model, "config", None), "out_channels", None)
        latent = out if isinstance(out, int) and out < spec.in_channels and spec.kind != "flux" else spec.in_channels
        if vae is not None and vae.config.latent_channels != latent:
            raise BadArgumentError(f"vae: its latents have {vae.config.latent_channels} channels and this "
                                   f"{spec.kind} network samples {latent}"
                                   + (" (a pixel model: it takes no VAE)" if latent in (1, 3) else "")
                                   + "; expected the VAE the network was trained with")
        self.model = model
        self.spec = spec
        self.device = torch.device(device)
        self.runner = runner if runner is not None else model  # what samplers call (replaced by optimize)
        self.vae = vae  # decodes latents for output_type "pil" / "np" and decode(); float32, not optimized
        self.prompt_encoder = prompt_encoder  # prompts -> text states (generate(prompt=...)); loads on first use
        self._lora_saved: dict = {}  # the network weights load_lora changed: id -> (parameter, original CPU copy)
        self.controlnet = None  # a fastdiff.models.controlnet.ControlNet driving the UNet (set_controlnet)
        self._graph_factory = None  # optimize()'s, kept for set_controlnet's rebuild of the runner
        self._optimize_notes: list[str] = []  # the last optimize()'s notes among self.notes (the next replaces them)
        self._encoders_cast = False  # whether the last optimize() cast the text encoders to its dtype
        self.config = None
        self.update_impl = "torch"  # how the samplers' state update runs (OptimizeConfig.sampler_update_impl)
        self.notes: list[str] = list(spec.notes)
        self.loop_graphs = None  # LoopGraphCache when optimize(cuda_graphs=True, graph_scope="loop")
        self.precompute_adaln = False  # captured loops compute every call's adaLN modulation at once
        # (steps, sampler, schedule) -> SamplingPlan: a serving loop asks for the same few plans on every
        # call, and building one (sigma grid, alphas, option checks) costs ~0.2 ms of host time per call.
        # Keyed also by the spec's sampling fields, so editing pipe.spec afterwards cannot serve stale plans.
        self._plans: dict = {}

    # ------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        if self.model is None:
            return torch.float32
        try:
            return next(self.model.parameters()).dtype
        except StopIteration:
            return torch.float32

    def _require_model(self, what: str) -> None:
        if self.model is None:
            raise BadArgumentError(f"{what} needs the PyTorch network, but this pipeline runs an exported artifact "
                                   f"({self.spec.source}); load the original checkpoint instead")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """A latent model's samples -> float32 images in [-1, 1] (B, 3, H, W) through its VAE decoder."""
        if self.vae is None:
            raise BadArgumentError("decode(): this pipeline has no VAE decoder; load one with fastdiff.load(..., "
                                   "vae='path/to/AutoencoderKL folder') (a pipeline folder's vae/ and a single file's "
                                   "first_stage_model are read automatically)")
        return self.vae.decode(latents)

    def encode_prompt(self, prompt, negative_prompt=None, *, guided: bool = False, clip_skip=None,
                      max_sequence_length=None, **extra_prompts) -> dict:
        """generate()'s text keyword arguments for ``prompt`` (``encoder_hidden_states``, ``text_embeds`` and, with
        ``guided``, their ``negative_`` forms), as the model's diffusers pipeline encodes it
        (``fastdiff.prompts.PromptEncoder.encode``). Reuse the result for many generate() calls to encode once.
        extra_prompts: ``prompt_2`` / ``prompt_3`` / ``negative_prompt_2`` / ``negative_prompt_3``, the texts of the
        second and third encoders (each defaults to ``prompt`` / ``negative_prompt``)."""
        unknown = sorted(set(extra_prompts) - set(EXTRA_PROMPTS))
        if unknown:
            raise BadArgumentError(f"encode_prompt(): unexpected arguments {unknown}; expected some of "
                                   f"{list(EXTRA_PROMPTS)}")
        if self.prompt_encoder is None and not self.spec.cross_attention_dim:
            raise BadArgumentError(f"prompt: given, but this model ({self.spec.kind}) is not text-conditioned")
        if self.prompt_encoder is None:
            why = next((n for n in self.notes if n.startswith(("no text encoders", "text encoders not used"))), None)
            raise BadArgumentError("prompt: this pipeline has no text encoders (a diffusers pipeline folder's "
                                   "tokenizer/ + text_encoder/ folders, or load(..., text_encoder='FOLDER')); pass "
                                   "encoder_hidden_states" + (" / text_embeds" if self.spec.text_embeds_dim else "")
                                   + " instead" + (f" ({why})" if why else ""))
        return self.prompt_encoder.encode(prompt, negative_prompt, guided=guided, clip_skip=clip_skip,
                                          max_sequence_length=max_sequence_length, **extra_prompts)

    def save(self, path: str) -> str:
        """Write the fastdiff format (folder: fastdiff.json + model.safetensors, + vae.safetensors with a VAE
        decoder, + copies of the text encoders' folders, + the ControlNets as diffusers' controlnet/ folders),
        atomically."""
        from .checkpoints.fastdiff_format import save_fastdiff

        self._require_model("save()")
        if self.prompt_encoder is not None and self.prompt_encoder.loras:
            raise BadArgumentError("save(): the text encoders carry a merged LoRA, and a save copies their folders "
                                   "as they are on disk; save before load_lora(), or after unload_lora()")
        if getattr(self.model, "ip_projection", None) is not None:
            raise BadArgumentError("save(): an IP-Adapter is loaded (its weights are not the checkpoint's); save "
                                   "before load_ip_adapter(), or after unload_ip_adapter() (a Face ID adapter's "
                                   "LoRA stays merged, as load_lora's do, until unload_lora())")
        if self.prompt_encoder is not None and self.prompt_encoder.embeddings:
            raise BadArgumentError("save(): the tokenizers carry textual inversion tokens, and a save copies their "
                                   "folders as they are on disk; save before load_textual_inversion(), or after "
                                   "unload_textual_inversion()")
        return save_fastdiff(path, self.model, self.spec, vae=self.vae, prompt_encoder=self.prompt_encoder,
                             controlnet=self.controlnet)

    def load_lora(self, lora, scale: float = 1.0) -> dict:
        """Merge a LoRA into the weights, as diffusers' ``load_lora_weights(lora)`` + ``fuse_lora(lora_scale=scale)``
        (``fastdiff.lora``: diffusers / PEFT and kohya safetensors files, a folder with diffusers' file, or a state
        dict). The network's layers and the text encoders' (when the file has them and this pipeline encodes
        prompts) are updated in place, so captured graphs and compiled models run the merged weights with nothing
        recaptured; several LoRAs add up. Costs a CPU copy of each weight it touches (for ``unload_lora``).
        Returns {part: layers merged} ("network", text encoder folders; "skipped": text-encoder parts this pipeline
        has no encoders for, which diffusers also skips)."""
        from .lora import by_part, merge, read_lora, targets

        self._require_model("load_lora()")
        if self.config is not None and self.config.backend in ("onnxruntime", "tensorrt"):
            raise BadArgumentError(f"load_lora(): this pipeline runs an exported {self.config.backend} graph, which "
                                   f"holds its own copy of the weights; load the LoRA first, then optimize()")
        scale = finite_number("scale", scale)
        parts = by_part(read_lora(lora))
        network = targets(parts.pop("network", {}), self.model, "the network")  # (all checked before any merge)
        report = {"network": len(network)}
        if parts and self.prompt_encoder is None:
            report["skipped"] = sorted(parts)
            warnings.warn(f"load_lora: layers for {sorted(parts)} skipped: this pipeline encodes no prompts",
                          stacklevel=2)
        elif parts:
            report.update(self.prompt_encoder.add_lora(parts, scale))
        merge(network, scale, self._lora_saved)
        return report

    def unload_lora(self) -> None:
        """Undo every ``load_lora``: the network's weights are put back in place (from the copies kept), the text
        encoders are read again from their folders on the next prompt."""
        from .lora import restore

        if self._lora_saved and self.config is not None and self.config.backend in ("onnxruntime", "tensorrt"):
            raise BadArgumentError(f"unload_lora(): this pipeline runs an exported {self.config.backend} graph, which "
                                   f"holds the merged weights; unload_lora() first, then optimize()")
        restore(self._lora_saved)
        self._face_id_loras = frozenset()  # (an IP-Adapter Face ID's LoRA went too: merged again at its next load)
        if self.prompt_encoder is not None:
            self.prompt_encoder.clear_loras()

    def load_textual_inversion(self, embedding, token: Optional[str] = None,
                               text_encoder: Optional[str] = None) -> dict:
        """Add a textual inversion embedding to the text encoders, as diffusers' ``load_textual_inversion``
        (``fastdiff.prompts.textual_inversion``: diffusers' .bin / .safetensors, A1111's .pt, SDXL's clip_l /
        clip_g pair, or a loaded state dict / tensor). ``token``: the prompt word (default: the file's own);
        ``text_encoder``: its encoder folder (default: the first; an SDXL pair fills both). Prompts naming the token
        then read its vectors. Returns {encoder folder: {token: vectors}}."""
        if self.prompt_encoder is None:
            raise BadArgumentError("load_textual_inversion(): this pipeline encodes no prompts (no text encoders)")
        return self.prompt_encoder.add_textual_inversion(embedding, token, text_encoder)

    def unload_textual_inversion(self) -> None:
        """Drop every added token: the tokenizers and encoders are read again from their folders."""
        if self.prompt_encoder is not None:
            self.prompt_encoder.clear_textual_inversions()

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> "Pipeline":
        """FreeU on a text UNet, as diffusers' ``enable_freeu(s1, s2, b1, b2)`` (``fastdiff.models.freeu``; any
        factor 0 turns it off, as diffusers reads them). No weight changes; the runner is built again (captured
        graphs and loops ran the network without it)."""
        from .models.freeu import set_freeu
        from .models.unet import UNet

        self._require_model("enable_freeu()")
        if not isinstance(self.model, UNet) or not self.model.config.conditional:
            raise BadArgumentError(f"enable_freeu(): FreeU scales a text UNet's up blocks (diffusers' "
                                   f"UNet2DConditionModel), and this model is a {self.spec.kind} "
                                   f"{type(self.model).__name__}")
        if self.config is not None and self.config.backend in ("onnxruntime", "tensorrt"):
            raise BadArgumentError(f"enable_freeu(): this pipeline runs an exported {self.config.backend} graph of "
                                   f"the network; enable_freeu() first (eager / triton / compile backends run it)")
        factors = [finite_number(name, v) for name, v in (("s1", s1), ("s2", s2), ("b1", b1), ("b2", b2))]
        set_freeu(self.model, *factors)
        self._rebuild_runner()
        return self

    def disable_freeu(self) -> "Pipeline":
        """FreeU off (diffusers' ``disable_freeu``)."""
        from .models.freeu import set_freeu

        if self.model is not None and hasattr(self.model, "up_blocks"):
            set_freeu(self.model)
            self._rebuild_runner()
        return self

    def optimize(self, config=None, graph_factory=None, **switches) -> "Pipeline":
        """Apply an ``OptimizeConfig`` (or its fields as keywords) once; returns self.

        graph_factory: replaces the CUDA-graph capture (tests use a stand-in to exercise the bucketing
        and static-buffer logic on a CPU).
        """
        from .runtime.config import OptimizeConfig
        from .runtime.loop_graph import LoopGraphCache
        from .runtime.runners import build_runner

        fields = sorted(f.name for f in dataclasses.fields(OptimizeConfig))
        unknown = sorted(set(switches) - set(fields))
        if unknown:
            raise BadArgumentError(f"optimize: unknown switch(es) {unknown}; expected among {fields}")
        if config is not None and not isinstance(config, OptimizeConfig):
            raise BadArgumentError(f"optimize: expected an OptimizeConfig or keyword switches (backend='triton', ...), "
                                   f"found {config!r}")
        if config is None:
            config = OptimizeConfig(**switches)
        elif switches:
            config = config.replace(**switches)
        self._require_model("optimize()")
        self.runner, notes = build_runner(self, config, graph_factory=graph_factory)
        self._graph_factory = graph_factory  # (kept once the runner is built: set_controlnet rebuilds with it)
        self.config = config
        self.update_impl = config.sampler_update_impl(self.device, self.model)
        # this config's notes replace the last one's (the loader's stay)
        self.notes = [n for n in self.notes if n not in self._optimize_notes] + notes
        self._optimize_notes = notes
        # the text encoders follow a precision asked for (as pipe.to), and come back with the network from one an
        # earlier config cast them to (an export backend's fp16 over a float32 network)
        if self.prompt_encoder is not None and (config.dtype is not None or self._encoders_cast):
            self.prompt_encoder.to(dtype=self._network_dtype())
        if self.image_encoder is not None and (config.dtype is not None or self._encoders_cast):
            self.image_encoder.to(dtype=self._network_dtype())  # (an IP-Adapter's, as diffusers' pipeline dtype)
        self._encoders_cast = config.dtype is not None
        self.loop_graphs = None
        capturable = graph_factory is not None or (self.device.type == "cuda" and torch.cuda.is_available())
        if config.cuda_graphs and config.graph_scope == "loop" and capturable and config.backend != "onnxruntime":
            self.loop_graphs = LoopGraphCache(config.max_graphs, graph_factory)
        applies = (self.loop_graphs is not None and config.backend in ("eager", "triton")
                   and getattr(self.model, "adaln_weight", None) is not None)
        # None (auto): on where it applies on a CUDA device (measured faster there), off elsewhere
        wanted = config.precompute_adaln if config.precompute_adaln is not None else self.device.type == "cuda"
        self.precompute_adaln = bool(wanted and applies)
        if config.precompute_adaln and not self.precompute_adaln:
            notes.append("precompute_adaln ignored: it needs a DiT with stacked adaLN projections (fuse_adaln), "
                         "a captured loop (cuda_graphs=True, graph_scope='loop') and backend 'eager' or 'triton'")
            self.notes.append(notes[-1])
        return self

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, n: int = 1, steps: int = 20, sampler: Optional[str] = None, schedule: Optional[str] = None,
                 cfg_scale=1.0, guidance_rescale=0.0, class_labels=None,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 negative_encoder_hidden_states: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                 seeds: Optional[Sequence[int]] = None, latents: Optional[torch.Tensor] = None,
                 height: Optional[int] = None, width: Optional[int] = None, output_type: str = "tensor",
                 progress: bool = True, callback=None, text_embeds=None, negative_text_embeds=None, time_ids=None,
                 negative_time_ids=None, guidance=None, prompt=None, negative_prompt=None, clip_skip=None,
                 max_sequence_length=None, image=None, strength: Optional[float] = None, prompt_2=None,
                 prompt_3=None, negative_prompt_2=None, negative_prompt_3=None, mask_image=None, control_image=None,
                 controlnet_conditioning_scale: Optional[float] = None, control_guidance_start: float = 0.0,
                 control_guidance_end: float = 1.0, guess_mode: bool = False,
                 denoising_end: Optional[float] = None, denoising_start: Optional[float] = None,
                 padding_mask_crop: Optional[int] = None, control_mode=None, control_mask=None,
                 ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None,
                 ip_adapter_clip_embeds=None, classifier_scale: Optional[float] = None,
                 noise_level: Optional[int] = None, **sampler_options):
        """Sample ``n`` images (latents for latent models).

        sampler / schedule: a fastdiff sampler name (``dpmpp_2m``, ``unipc``, ``ddim``, ...) and sigma
            grid (``karras``, ``exponential``, ``leading``, ``trailing``, ...); both None follow the
            checkpoint's diffusers scheduler config.
        cfg_scale: classifier-free guidance (1.0: no unconditional pass). Class models guide against
            their null label; text models need ``negative_encoder_hidden_states``. One scale, or one per sample
            (a list or a (B,) tensor): samples of different scales share one batch (the Engine batches them so),
            and a captured loop (``graph_scope="loop"``) takes the scales as an input, so a new scale captures
            nothing new. A sample's result does not depend on the others' scales; a sample at 1.0 among guided
            ones is computed guided (equal to its unguided run up to float rounding).
        guidance_rescale: phi of Lin et al. 2023 (diffusers' ``guidance_rescale``; 0 or less: none), one or one per
            sample as ``cfg_scale``; an input of a captured loop too.
        text_embeds / time_ids (SDXL-style UNets, ``fastdiff.text_time``): the pooled text embedding (B, P) and
            the micro-conditioning ids (N numbers or (B, N)); ids default to diffusers' (the image's own size,
            no crop). Guided runs also take ``negative_text_embeds`` (and optionally ``negative_time_ids``).
            SD3 and Flux take ``text_embeds`` alone (diffusers' ``pooled_prompt_embeds``).
        prompt / negative_prompt: text, one string or one per sample, encoded by the folder's own tokenizers and
            text encoders as its diffusers pipeline does (``encode_prompt``) into the arguments above; not together
            with them. A list of prompts with the default ``n`` gives one sample per prompt. The negative defaults
            to the empty prompt (zeros where SDXL's force_zeros_for_empty_prompt says so; FLUX.1's true CFG needs
            one). clip_skip / max_sequence_length: diffusers' (T5's token count).
        prompt_2 / prompt_3, negative_prompt_2 / negative_prompt_3: as diffusers' SDXL / SD3 / FLUX.1 pipelines, the
            texts of the second encoder (SDXL's text_encoder_2, SD3's second CLIP, FLUX.1's T5) and the third (SD3's
            T5); each defaults to ``prompt`` / ``negative_prompt``. A prompt no encoder of the model reads is refused.
        guidance: a guidance-distilled model's strength (FLUX.1 dev; diffusers' FluxPipeline ``guidance_scale``,
            default 3.5), one or one per sample: an input of the network, not classifier-free guidance (``cfg_scale``).
        seed / seeds: ``seeds=[...]`` gives one generator per sample (a sample depends on its own seed
            only); ``seed=s`` means seeds s, s+1, ...; neither draws random seeds; not both.
        latents: the initial unit-normal noise (B, C, H, W), as diffusers' ``latents=`` (a torch tensor or a
            NumPy array); it fixes the batch (``n`` may only repeat it) and, by default, the size.
        height / width: in latent pixels (default: the model's sample size).
        image on a super-resolution model (``spec.low_res_channels``: guided-diffusion's upsamplers): the
            low-resolution image(s) to upsample (read as below; any size), which the network reads upsampled bilinearly
            to the output size (default: 4x the image, as both released upsamplers), as guided-diffusion's
            super_res_sample.py; no strength, mask or crop. On Stable Diffusion's x4 upscaler (a
            StableDiffusionUpscalePipeline folder): the image to upscale, its latents the image's size, the image noised
            to ``noise_level`` (default 20) as that pipeline does.
        image / strength: image-to-image (SDEdit), as diffusers' img2img pipelines: the image (one, or one per sample;
            PIL, NumPy uint8 / [0, 1] floats, or tensors in [0, 1]; see ``fastdiff.img2img``) is encoded by the VAE's
            encoder (a pixel model takes it as it is), noised to the grid's sigma at ``strength`` (0-1; default the
            model's diffusers pipeline's: 0.8 SD, 0.3 SDXL, 0.6 SD3 / FLUX.1), and only the remaining steps run
            (``int(steps * strength)`` of them, by diffusers' rounding). The image fixes the size; not with latents.
        mask_image: inpainting, with ``image``: white repaints (one mask, or one per image, at the image's size; PIL
            images and uint8 arrays as pixels, float arrays and tensors as they are, binarized at 0.5), as diffusers'
            inpainting pipelines (``fastdiff.inpaint``). An inpainting network (``spec.inpainting``: SD / SDXL
            inpainting UNets, which need it) reads the mask and the masked image; any other model has the kept part
            of the image pasted back after every step. strength defaults to theirs: 1.0 for SD (pure noise), 0.9999
            for SDXL, 0.6 for SD3 / FLUX.1.
        padding_mask_crop: inpaint only a box around the mask, this many pixels wider on each side and grown to the
            output's aspect ratio, resized to the output size (``height`` / ``width``; by default the model's, and
            with a UNet's ControlNet the image's own, as diffusers' ControlNet inpainting pipelines), then pasted
            back into the image (``fastdiff.mask_crop``, as diffusers' ``padding_mask_crop``): one PIL image and one
            PIL mask, ``output_type="pil"``; the results have the image's own size.
        control_image / controlnet_conditioning_scale / control_guidance_start / control_guidance_end / guess_mode:
            a ControlNet's conditioning image (one, or one per sample; PIL and uint8 pixels in [0, 1], float arrays and
            tensors as they are; not resized: its size fixes the output's, as in diffusers' SD ControlNet pipelines
            given no height / width, while its SD3 / FLUX.1 ones resize it to their default size) and diffusers'
            ControlNet pipelines' options (``fastdiff.controlnet``), once ``set_controlnet`` has given the pipeline
            a ControlNet. Defaults follow diffusers' pipeline for the task: scale 1.0, 0.8 with an image to edit (and
            strength 0.8, SDXL too), 0.5 with a mask on SD (1.0 on SDXL). FLUX.1 Depth / Canny
            (``spec.latent_control``) take the control image without a scale or window, read as ``image`` is (float
            arrays and tensors in [0, 1], or [-1, 1]) and encoded by the VAE as FluxControlPipeline encodes PIL
            images (diffusers hands a tensor to the VAE as it is); with ``image`` (and ``mask_image``) as
            FluxControlImg2ImgPipeline (and FluxControlInpaintPipeline), its posterior drawn before the image's.
        control_mode: a FLUX.1 Union ControlNet's control type (an int; for several ControlNets one each, None for
            a plain one, or one int for every Union one), as FluxControlNetPipeline's. An SD3 / FLUX.1 ControlNet
            (``set_controlnet`` of an SD3ControlNetModel / FluxControlNetModel folder) reads the control image's VAE
            latents (read as ``image`` is, float tensors in [0, 1] shifted to [-1, 1], which diffusers' SD3 / FLUX.1
            ControlNet pipelines hand to the VAE unshifted; FLUX.1's posterior drawn per sample before its start
            noise, SD3's mean; XLabs' FLUX.1 ControlNets read the image itself, in [-1, 1]), with diffusers' scale
            and step window (no guess mode). FLUX.1's: guidance defaults
            to 7, as FluxControlNetPipeline's; with ``image`` (and ``mask_image``) as FluxControlNetImg2ImgPipeline
            (and FluxControlNetInpaintPipeline), strength 0.6 and scale 1.0 by default; with true CFG (cfg_scale)
            both passes read the ControlNet's outputs for the conditional text, as that pipeline's true_cfg_scale.
        control_mask: an SD3 inpainting ControlNet's mask (white: repaint; one, or one per sample, at the control
            image's size, read as ``mask_image`` is), as StableDiffusion3ControlNetInpaintingPipeline's: the
            ControlNet reads the control image with its masked pixels black, encoded, and the inverted mask; the
            sample starts from noise, and nothing is pasted back.
        ip_adapter_image / ip_adapter_image_embeds: the image prompt of a loaded IP-Adapter (``load_ip_adapter``):
            an image (PIL, array or a preprocessed tensor, as diffusers' ``ip_adapter_image``) or a list of them (their
            tokens one after another) for every sample, the unconditional pass on zero embeddings (diffusers'; IP-Adapter
            Plus: a black image's hidden states); or CLIP image features: a tensor (D,), (N, D) or (B, N, D) (one per
            sample; Plus: the penultimate hidden states (S, E), (N, S, E) or (B, N, S, E)), the unconditional pass as
            for an image, or diffusers' form, a list of one tensor, under guidance [negative, positive] stacked on the
            batch. With several adapters loaded: a list with one entry per adapter (an image or a list of images;
            diffusers' list form of the features). IP-Adapter Face ID Plus takes both: the face embedding as
            ``ip_adapter_image_embeds`` and the face crop as ``ip_adapter_image`` (encoded to its hidden states), or
            its hidden states as ``ip_adapter_clip_embeds`` (``fastdiff.ip_faceid_plus_inputs``).
        ip_adapter_clip_embeds: IP-Adapter Face ID Plus's precomputed CLIP penultimate hidden states of the face crop
            ((S, E), (N, S, E) or (B, N, S, E); diffusers' ``clip_embeds``, negatives first, beside embeddings in
            diffusers' list form under guidance), in place of ``ip_adapter_image``.
        ip_adapter_masks: where each image prompt acts (diffusers' ``cross_attention_kwargs["ip_adapter_masks"]``):
            per adapter None or its (1, N, H, W) masks (one per image; ``fastdiff.ip_adapter_mask`` makes them from
            mask images, as diffusers' ``IPAdapterMaskProcessor``) or the mask images themselves; a tensor for one
            adapter. Each masked image gets its own attention, weighted by its mask in every layer.
        denoising_end / denoising_start: SDXL's ensemble of expert denoisers, as diffusers' SDXL pipelines
            (``fastdiff.experts``): with ``denoising_end`` the run stops after the steps whose training timestep is
            >= round(T (1 - end)) and returns its state (diffusers' noisy latents), not x0; with
            ``denoising_start`` (and ``image``: those latents, or an image to encode) it starts at the first step
            below round(T (1 - start)) from the image's latents as they are, unnoised (no ``strength``).
            Samplers with one network evaluation per step; with a mask (a regular UNet's refiner takes the base's
            latents and the mask in pixels), and with a ControlNet (a base run, or inpainting: diffusers' SDXL
            ControlNet and ControlNet inpainting pipelines), not with padding_mask_crop.
        classifier_scale: classifier guidance's strength with a loaded noisy-image classifier (``load_classifier``:
            guided-diffusion's, as its classifier_sample.py; default the one given there; one, or one per sample as
            ``cfg_scale``; 0 everywhere: no classifier pass): steers each sample to its ``class_labels`` (which an
            unconditional model leaves to the classifier). DDPM conditions its posterior
            mean, every other sampler its x0 (guided-diffusion's DDIM); it runs eagerly (a captured loop,
            ``graph_scope="loop"``, is not used).
        output_type: ``tensor`` (B, C, H, W) float32 in the model's range (latents for a latent model), ``np``
            uint8 (B, H, W, C), ``pil`` a list of PIL images (1 or 3 channels); a latent model with a VAE decoder
            (``pipe.vae``) is decoded for ``np`` / ``pil``.
        Returns float32 results whatever the network dtype (the sampler state is always float32).
        """
        from .noise import NoiseSource

        if output_type not in OUTPUT_TYPES:
            raise BadArgumentError(f"output_type: expected one of {OUTPUT_TYPES}, found {output_type!r}")
        if output_type != "tensor" and self.vae is None and self.spec.in_channels not in (1, 3):
            raise BadArgumentError(f"output_type={output_type!r}: images of a latent model ({self.spec.in_channels} "
                                   f"channels) come from a VAE, and this pipeline has none (fastdiff.load(..., "
                                   f"vae='AutoencoderKL folder')); output_type='tensor' returns the latents")
        low_res = None  # a super-resolution network's images to upsample, (k, C, h, w) in [0, 1]
        if self.spec.low_res_channels:
            low_res, image = self._low_res_images(image, strength, mask_image, denoising_start=denoising_start,
                                                  padding_mask_crop=padding_mask_crop), None
        crop = None  # padding_mask_crop: the crop inpainted in place of the image, then pasted back
        if padding_mask_crop is not None:
            from .mask_crop import crop_to_mask

            f = 1 if self.vae is None else self.vae.downscale
            if self.controlnet is not None and not self._latent_controlnet():  # (the image's own size by default, as
                size = tuple(None if v is None else f * v for v in (height, width))  # its ControlNet pipelines)
            else:
                size = tuple(f * v for v in self._size(height, width))
            crop = crop_to_mask(image, mask_image, padding_mask_crop, output_type, size, multiple=f)
            image, mask_image = crop.image, crop.mask
            control_image = None if control_image is None else crop.control(control_image)
        latents = _as_latents(latents)
        # (k, C, H, W): images in [0, 1], or (given_latents) a latent model's latents as generate() returns them
        images, given_latents = self._img2img_images(image, strength, latents)
        # (k, 1, H, W) of 0 / 1, for inpainting (a refiner's from a base run's latents too)
        masks = self._inpaint_masks(mask_image, images, given_latents, refiner=denoising_start is not None)
        control = self._control_images(control_image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode)  # (k, 3, H, W) in [0, 1], or None
        control_masks = self._control_masks(control_mask, control)  # (k, 1, H, W) of 0 / 1: SD3 inpainting ControlNets
        if control is not None:
            height, width = self._control_size(control, height, width)
            if images is not None:  # (both fix the size: they must agree)
                f = 1 if self.vae is None or given_latents else self.vae.downscale
                if (images.shape[2] // f, images.shape[3] // f) != (height, width):
                    raise BadArgumentError(f"control_image / image: the control image fixes the latent size to "
                                           f"{height}x{width} and the image to {images.shape[2] // f}x"
                                           f"{images.shape[3] // f}; expected one size")
        given_images = images if low_res is None else low_res
        if given_images is not None and given_images.shape[0] > 1 and n == 1 and seeds is None:
            n = given_images.shape[0]  # one sample per image
        if isinstance(prompt, (list, tuple)) and len(prompt) > 1 and n == 1 and seeds is None and latents is None:
            n = len(prompt)  # one sample per prompt, as diffusers' pipelines
        seeds = self._seeds(n, seed, seeds, latents)
        b = len(seeds)
        if images is not None:  # (one image for several samples: each encodes its own copy, from its own generator)
            images, height, width = self._img2img_size(images, b, height, width, given_latents)
            if masks is not None:
                if masks.shape[0] not in (1, b):
                    raise BadArgumentError(f"mask_image: expected {one_or(b, 'masks')} (one per sample), found "
                                           f"{masks.shape[0]}")
                masks = masks.expand(b, -1, -1, -1)
        cfg_scales = _per_sample_numbers("cfg_scale", cfg_scale, b)
        rescales = _per_sample_numbers("guidance_rescale", guidance_rescale, b)
        from .cfg_pp import CFG_PP_SAMPLERS

        cfg_pp = isinstance(sampler, str) and sampler in CFG_PP_SAMPLERS
        guided = any(self.guides(sampler, scale) for scale in cfg_scales)
        if latents is not None and height is None and width is None:
            height, width = int(latents.shape[2]), int(latents.shape[3])  # the latents fix the size
        elif low_res is not None and height is None and width is None:
            f = self.spec.low_res_upscale
            height, width = f * int(low_res.shape[2]), f * int(low_res.shape[3])
        h, w = self._size(height, width)
        shape = (self.spec.in_channels, h, w)
        plan = self.plan(steps, sampler, schedule, size=(h, w), **sampler_options)
        experts = self._check_experts(plan, denoising_end, denoising_start, images, strength, control, crop,
                                      masks is not None, given_latents)
        noise = NoiseSource(seeds, self.device)
        level = self._noise_level(noise_level, class_labels)  # an upscaler's noise level: its class label
        # (an upscaler's image noise is drawn before the start noise)
        low_res_input = None if low_res is None else self._low_res_input(low_res, b, (h, w), noise, level)
        pure_noise = False  # inpainting at strength 1: diffusers starts from noise alone, the image unencoded
        if images is not None and denoising_start is not None:  # a refiner: from the first step below the cutoff
            plan = plan.from_step(experts.start_index(plan, denoising_start, self._train_steps()))
        elif images is not None:  # the grid's tail; the image is encoded once every argument has been checked
            strength, t_start = self._img2img_strength(strength, plan.steps, inpaints=masks is not None)
            pure_noise = masks is not None and strength == 1.0
            plan = plan if pure_noise else plan.from_step(t_start)
        elif latents is None:  # (FLUX.1 Depth / Canny and ControlNets: after the control image's posteriors, below)
            latents = None if self.spec.latent_control or self._latent_controlnet() == "flux" else noise.randn(shape)
        else:
            latents = torch.as_tensor(latents, dtype=torch.float32, device=self.device)
            if tuple(latents.shape) != (b,) + shape:
                raise BadArgumentError(f"latents: expected shape {(b,) + shape}, found {tuple(latents.shape)}")
        window_plan = plan  # (a ControlNet's step window spans the grid before a base run's cut, as diffusers')
        if denoising_end is not None:  # a base run: the steps down to the cutoff, handing on its state
            k, first_stage = experts.steps_until(plan, denoising_end, self._train_steps())
            plan = plan.to_first_stage(k) if first_stage else plan.to_step(k) if k < plan.steps else plan

        encoder_hidden_states, negative_encoder_hidden_states, text_embeds, negative_text_embeds = self._text_arguments(
            b, guided, prompt, negative_prompt, dict(zip(EXTRA_PROMPTS, (prompt_2, prompt_3, negative_prompt_2,
                                                                         negative_prompt_3))),
            clip_skip, max_sequence_length, encoder_hidden_states, negative_encoder_hidden_states, text_embeds,
            negative_text_embeds)
        if classifier_scale is not None and self.classifier is None:
            raise BadArgumentError("classifier_scale: no classifier is loaded (pipe.load_classifier)")
        steer = self._classifier_labels(class_labels, b)  # a classifier's labels (an unconditional model's alone)
        if level is not None:  # (the same label for both CFG passes)
            class_labels = [level] * b
        cond, uncond = self._conditioning(b, None if steer is not None and self.spec.num_classes is None
                                          else class_labels, encoder_hidden_states, negative_encoder_hidden_states,
                                          guided, shared_labels=level is not None)
        added, added_uncond = text_time_conditioning(
            self.spec, b, (h, w), guided, self.device, self._network_dtype(), text_embeds=text_embeds,
            negative_text_embeds=negative_text_embeds, time_ids=time_ids, negative_time_ids=negative_time_ids,
            **({} if self.vae is None else dict(scale=self.vae.downscale)))  # (default ids in the VAE's pixels)
        cond.update(added)
        uncond.update(added_uncond)
        if low_res_input is not None:  # (b, C, h, w), shared by both CFG passes
            cond["image_latents"] = low_res_input
        image_embeds = self._ip_adapter_embeds(ip_adapter_image, ip_adapter_image_embeds, b, guided,
                                               ip_adapter_clip_embeds)
        if image_embeds is not None:  # an IP-Adapter's image prompt (the unconditional pass's: zeros, or given)
            cond["image_embeds"] = image_embeds[0]
            if guided:
                uncond["image_embeds"] = image_embeds[1]
            image_masks = self._ip_adapter_masks(ip_adapter_masks, image_embeds[0], b, (h, w))
            if image_masks is not None:  # (both CFG passes read them, as diffusers' cross_attention_kwargs)
                cond["image_masks"] = image_masks
        elif ip_adapter_masks is not None:
            raise BadArgumentError("ip_adapter_masks: given, but no image prompt (ip_adapter_image) runs")
        # (both CFG passes share it; FluxImg2Img / FluxInpaintPipeline default to 7, FluxPipeline to 3.5)
        cond.update(guidance_conditioning(self.spec, b, guidance, self.device,
                                          edits=images is not None or self._latent_controlnet() == "flux"))
        denoiser = base = plan.make_denoiser(self.runner, dtype=self._network_dtype())
        blends = masks is not None and not self.spec.inpainting  # a regular model: the image pasted back per step
        if control is not None and self.spec.latent_control:  # FLUX.1 Depth / Canny: the posteriors, then the noise
            if blends and self.vae is not None:  # FluxControlInpaintPipeline encodes the (unread) masked image first
                noise.randn(shape)
            cond["image_latents"] = self._control_latents(control, b, noise).to(self._network_dtype())
            if images is None and latents is None:  # (FluxControlImg2Img / Inpaint: the image's posterior and the
                latents = noise.randn(shape)  # noise come below)
        elif control is not None:  # a ControlNet's inputs (an SD3 / FLUX.1 one's: its image's latents)
            from .controlnet import ControlWindow

            added, added_uncond = self._controlnet_inputs(
                control, b, plan, noise, guided, images, masks, cond, controlnet_conditioning_scale,
                control_guidance_start, control_guidance_end, guess_mode, control_mode, control_masks, window_plan)
            if images is None and latents is None:  # (FLUX.1's: after its posteriors; an image's come below)
                latents = noise.randn(shape)
            cond.update(added)
            uncond.update(added_uncond)
            denoiser = ControlWindow(denoiser)
        extra = dict(cond)
        denoiser = self._guided(denoiser, extra, uncond, guided, cfg_scales, rescales)
        denoiser = self._classifier_guided(denoiser, base, steer, None if classifier_scale is None else
                                           _per_sample_numbers("classifier_scale", classifier_scale, b))
        if cfg_pp and guided and getattr(denoiser, "denoise_pair_at", None) is None:
            raise BadArgumentError(f"sampler {sampler!r} (CFG++) steps with the unconditional prediction apart from "
                                   f"the guided one: not under a CFG-folded graph (which returns the guided output "
                                   f"only) or with classifier guidance")

        if self.loop_graphs is not None and callback is not None and not classifier_guided(denoiser):
            raise BadArgumentError("callback: a captured sampling loop (graph_scope='loop') runs no Python per "
                                   "step; use graph_scope='step' to get per-step callbacks")
        if images is not None:  # the posterior draws come first, then the start noise (diffusers' order)
            # (an inpainting UNet at strength 1 starts from noise alone: its pipeline encodes no image then;
            # FluxFillPipeline encodes it whatever the strength)
            unread = pure_noise and not blends and self.spec.kind != "flux"
            # (one image for several samples: each sample's posterior, as SD's img2img pipelines draw them; diffusers'
            # inpainting and FLUX.1 img2img pipelines draw it once, from the first generator, and repeat it, which
            # makes a sample depend on the batch's first seed)
            clean = None if unread else self._clean_latents(images, given_latents, noise)
            if denoising_start is not None:  # (a base run's state, in the scheduler's frame: no noise added)
                latents = clean / experts.latents_scale(plan, float(plan.sigmas[0]))
                # (SDXL's inpainting pipeline still draws the noise its blend reads)
                start_noise = noise.randn(shape) if masks is not None else None
            else:
                start_noise = noise.randn(shape)
                latents = start_noise if pure_noise else plan.noised(clean, start_noise)
        if masks is not None:  # then the masked image's posterior draws
            from .inpaint import image_latents, latent_masks

            if blends:  # (an inpainting network alone reads the masked image, but diffusers draws its posterior)
                if self.vae is not None and not self.spec.latent_control and not given_latents:  # (the encoder's
                    noise.randn(shape)  # draw: one (C, h, w) per masked image)
                extra[KNOWN_REGION] = dict(clean=clean, noise=start_noise, mask=latent_masks(masks, (h, w)).to(
                    self.device))
            elif self.spec.kind == "flux":  # FLUX.1 Fill: (b, C + f*f, h, w), shared by both CFG passes
                from .inpaint import fill_image_latents

                extra["image_latents"] = fill_image_latents(self.vae, images, masks, noise,
                                                            self.spec.image_latents_channels).to(
                    self._network_dtype())
            else:  # (b, 1 + C, h, w), shared by both CFG passes
                extra["image_latents"] = image_latents(self.vae, images, masks, noise, (h, w)).to(
                    self._network_dtype())
        x = self._run(plan, denoiser, latents, extra, noise, guided, progress, callback)
        if output_type != "tensor" and self.vae is not None and self.spec.in_channels not in (1, 3):
            x = self.decode(x)  # latents -> images, as diffusers' pipelines do for "pil" / "np"
        return _to_output(x, output_type) if crop is None else crop.overlay(_to_output(x, output_type))

    def _text_arguments(self, b, guided, prompt, negative_prompt, extra_prompts: dict, clip_skip, max_sequence_length,
                        encoder_hidden_states, negative_encoder_hidden_states, text_embeds, negative_text_embeds):
        """generate's text states and pooled embeddings (and their negatives): the ones given, or its prompts
        encoded (``encode_prompt``), once their counts are checked against the ``b`` samples."""
        extra_prompts = {name: value for name, value in extra_prompts.items() if value is not None}
        if extra_prompts or any(v is not None for v in (prompt, negative_prompt, clip_skip, max_sequence_length)):
            from .prompts import prompt_list

            given = [k for k, v in dict(encoder_hidden_states=encoder_hidden_states, text_embeds=text_embeds,
                                        negative_encoder_hidden_states=negative_encoder_hidden_states,
                                        negative_text_embeds=negative_text_embeds).items() if v is not None]
            if prompt is None or given:
                raise BadArgumentError("prompt: expected a prompt, or the encoded text arguments, not both and not "
                                       f"negative_prompt / prompt_2 / clip_skip / ... alone; found "
                                       f"prompt={prompt!r} with {given or 'nothing else'}")
            for name, texts in (("prompt", prompt), ("negative_prompt", negative_prompt), *extra_prompts.items()):
                count = 1 if texts is None else len(prompt_list(texts, name))
                if count not in (1, b):  # (checked before the encoders load)
                    raise BadArgumentError(f"{name}: expected {one_or(b, 'prompts')} (one per sample; pass n= or seeds= "
                                           f"for more samples), found {count}")
            text = self.encode_prompt(prompt, negative_prompt, guided=guided, clip_skip=clip_skip,
                                      max_sequence_length=max_sequence_length, **extra_prompts)
            encoder_hidden_states = text["encoder_hidden_states"]
            negative_encoder_hidden_states = text.get("negative_encoder_hidden_states")
            text_embeds, negative_text_embeds = text.get("text_embeds"), text.get("negative_text_embeds")
        return encoder_hidden_states, negative_encoder_hidden_states, text_embeds, negative_text_embeds

    def _guided(self, denoiser, extra: dict, uncond: dict, guided: bool, cfg_scales: list, rescales: list):
        """The denoiser that guides (classifier-free guidance, or a CFG-folded graph's), its per-sample scales and
        rescales put into ``extra`` (inputs of a captured loop, not constants of it); ``denoiser`` unguided."""
        from .denoiser import CFGDenoiser, FoldedCFGDenoiser

        if getattr(self.runner, "cfg_folded", False):  # an exported graph that guides inside: one call of batch B
            if any(r > 0 for r in rescales) and guided:  # (unguided, the rescale is a no-op, as eager ignores it)
                raise BadArgumentError("guidance_rescale: this CFG-folded graph returns the guided output only, and "
                                       "rescaling needs the conditional pass; export without cfg_folded for it")
            denoiser = FoldedCFGDenoiser(denoiser)
            if guided:
                extra["uncond"] = uncond
            extra["guidance_scale"] = torch.tensor(cfg_scales, dtype=torch.float32, device=self.device)  # (B,)
        elif guided:  # the scales travel with the conditioning: a captured loop reads them from its inputs
            denoiser = CFGDenoiser(denoiser, None, guided_channels=self.spec.guided_channels)
            extra["uncond"] = uncond
            extra["guidance_scale"] = torch.tensor(cfg_scales, dtype=torch.float32, device=self.device)  # (B,)
            if any(r > 0 for r in rescales):  # phi an input too: a captured loop replays for a new value
                extra["guidance_rescale"] = torch.tensor(rescales, dtype=torch.float32, device=self.device)  # (B,)
        return denoiser

    def _run(self, plan, denoiser, latents, extra: dict, noise, guided: bool, progress: bool, callback):
        """The sampling loop, eager or from a captured graph, under a progress bar (closed if the run raises)."""
        bar = _progress(plan.steps, progress)

        def step_callback(info):
            if bar is not None:
                bar.update(1) if bar.n < bar.total else None
            if callback is not None:
                callback(info)

        try:
            with update_impl(self.update_impl):  # the samplers' state update: torch or one fused kernel
                # (classifier guidance differentiates its classifier: it runs eagerly, the network per step)
                if self.loop_graphs is not None and not classifier_guided(denoiser):
                    x = self._sample_loop_graph(plan, denoiser, latents, extra, noise, guided)
                    if bar is not None:
                        bar.update(plan.steps)
                else:
                    x = _sample_plan(plan, denoiser, latents, extra, noise, step_callback)
        finally:  # a run that raises must not leave its bar on the terminal
            if bar is not None:
                bar.close()
        return x

    def _sample_loop_graph(self, plan, denoiser, latents, extra, noise, guided) -> torch.Tensor:
        """The whole loop from a captured graph, padded to the batch bucket (graph_scope="loop").

        Batches beyond the largest bucket run in bucket-sized chunks, each from its own samples' generators.
        """
        from .models.modulation_schedule import ModulationSchedule, scheduled
        from .runtime.graphs import bucket_for, pad_to

        b, top = latents.shape[0], self.config.batch_buckets[-1]
        if b > top:
            parts = [self._sample_loop_graph(plan, denoiser, latents[i:i + top],
                                             map_tensors(lambda t, i=i: _rows(t, i, top, b), extra),
                                             noise.subset(i, i + top), guided) for i in range(0, b, top)]
            return torch.cat(parts)
        bucket = bucket_for(b, self.config.batch_buckets)
        padded = map_tensors(lambda t: pad_to(t, bucket), extra)
        # everything that fixes the captured arithmetic: grid, sampler and its options, denoiser, shapes, and
        # the kernels of the state update
        key = (bucket, tuple(latents.shape[1:]), plan.scheduler, plan.sampler, tuple(plan.sigmas.tolist()),
               freeze(plan.options), plan.denoiser_kind, freeze(plan.denoiser_options), plan.init_noise_sigma,
               plan.output_scale, guided, freeze(map_tensors(lambda t: (tuple(t.shape), t.dtype), padded)),
               self.update_impl)

        # used only if this call captures: the loop's warm-up run teaches it the network calls
        schedule = ModulationSchedule() if self.precompute_adaln else None

        def run_loop(x, cond, step_noise):
            with scheduled(self.model, schedule):
                return _sample_plan(plan, denoiser, x, cond, step_noise)

        def padded_noise(i, like):  # real rows from their own generators, padded rows repeat the last
            return pad_to(noise(i, like[:b]), like.shape[0])

        return self.loop_graphs.run(key, run_loop, pad_to(latents, bucket), padded, padded_noise)[:b]

    # ------------------------------------------------------------------------------------------
    def _seeds(self, n, seed, seeds, latents) -> list[int]:
        if seed is not None and seeds is not None:
            raise BadArgumentError(f"seed / seeds: expected one of them, found both (seed={seed!r}, seeds={seeds!r})")
        if seeds is not None:
            seeds = [seeds] if isinstance(seeds, int) else list(seeds)
            if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
                raise BadArgumentError(f"seeds: expected a non-empty list of ints, found {seeds!r}")
            if n not in (1, len(seeds)):
                raise BadArgumentError(f"n={n} but {len(seeds)} seeds were given: one sample per seed")
            return [check_seed(s) for s in seeds]
        if latents is not None:  # the latents fix the batch; n may repeat it
            if n not in (1, latents.shape[0]):
                raise BadArgumentError(f"n={n} but latents hold {latents.shape[0]} samples: one sample per row")
            n = int(latents.shape[0])
        if not isinstance(n, int) or n < 1:
            raise BadArgumentError(f"n: expected a positive integer, found {n!r}")
        if seed is None:
            seed = random.randrange(2**31)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise BadArgumentError(f"seed: expected an int, found {seed!r}")
        return [check_seed(seed + i) for i in range(n)]

    def _size(self, height, width) -> tuple[int, int]:
        h0, w0 = self.spec.sample_size
        h = h0 if height is None else height
        w = w0 if width is None else width
        for name, v in (("height", h), ("width", w)):
            if not isinstance(v, int) or v < 1:
                raise BadArgumentError(f"{name}: expected a positive integer, found {v!r}")
        if self.spec.kind == "dit" and (h, w) != (h0, w0):
            raise BadArgumentError(f"height/width: this DiT takes {h0}x{w0} latents only, found {h}x{w}")
        if self.spec.kind == "flux" and (h % 2 or w % 2):  # 2x2 latent patches become its tokens
            raise BadArgumentError(f"height/width: Flux takes even latent sizes (2x2 patches), found {h}x{w}")
        if self.spec.kind == "mmdit":  # any size the position table covers, in whole patches
            p, top = self.spec.model_config["patch_size"], self.spec.model_config["pos_embed_max_size"]
            if h % p or w % p or max(h, w) > top * p:
                raise BadArgumentError(f"height/width: this MMDiT takes multiples of its patch size {p} up to "
                                       f"{top * p} latent pixels per side, found {h}x{w}")
        from .models.unet import UNet, level_sizes

        if isinstance(self.model, UNet):  # a level too small for its downsampling: said here, not by torch's conv
            level_sizes(self.model, h, w)
        return h, w

    def _conditioning(self, b, class_labels, ctx, neg_ctx, guided: bool, shared_labels: bool = False):
        """(cond, uncond) keyword dicts for the network; ``shared_labels``: both CFG passes read the class labels (an
        upscaler's noise level), not the null label."""
        spec = self.spec
        cond, uncond = {}, {}
        out_channels = getattr(getattr(self.model, "config", None), "out_channels", None)
        if spec.kind == "flux":  # (its config counts packed channels; FluxConfig checks the layout)
            out_channels = None
        if isinstance(out_channels, int) and out_channels not in (spec.in_channels, 2 * spec.in_channels):
            # depth (5 = 4 latents + depth), instruct-pix2pix (8); SD inpainting UNets (9) are ModelSpec.inpainting
            raise UnsupportedConfigError(
                "in_channels", spec.in_channels, model="generate()",
                supported=f"{out_channels} (the network's output channels): this network takes "
                          f"{spec.in_channels - out_channels} conditioning channels beside its {out_channels} "
                          f"latent ones (inpainting, depth or image conditioning), which generate() cannot supply"
                if out_channels < spec.in_channels else f"{out_channels} or {out_channels // 2}")
        if getattr(self.model, "class_embedding", None) is not None and not spec.num_classes:
            # a continuous class input (diffusers' class_embed_type "timestep" / "identity" / "projection", e.g.
            # DeepFloyd IF's noise-augmentation level): nothing here says what values to feed
            raise UnsupportedConfigError(
                "class_embed_type", self.model.config.class_embed_type, model="generate()",
                supported="None, or class labels from a table (num_class_embeds): this UNet conditions on a "
                          "continuous class input that generate() cannot supply; call pipe.model(x, t, "
                          "class_labels=...) directly")
        if spec.num_classes:
            if class_labels is None:
                if spec.null_class is None:
                    raise BadArgumentError(f"class_labels: this model is class-conditional ({spec.num_classes} "
                                           f"classes, no null label): expected {b} labels, found None")
                class_labels = [spec.null_class] * b
            labels, lo, hi = integer_labels(class_labels, b)
            top = spec.label_bound
            labels = labels.to(self.device)
            if lo < 0 or hi >= top:
                raise BadArgumentError(f"class_labels: expected labels in [0, {top - 1}] ({spec.num_classes} classes"
                                       + (f", {spec.null_class} = unconditional" if spec.null_class is not None else "")
                                       + f"), found {lo if lo < 0 else hi}")
            cond["class_labels"] = labels
            if guided and not shared_labels:  # (keys absent from uncond are shared by both passes)
                if spec.null_class is None:
                    raise BadArgumentError("cfg_scale != 1 needs an unconditional label, but this model has none")
                uncond["class_labels"] = torch.full_like(labels, spec.null_class)
        elif class_labels is not None:
            raise BadArgumentError("class_labels were given, but this model is not class-conditional")
        if spec.cross_attention_dim:
            if ctx is None:
                raise BadArgumentError(f"encoder_hidden_states: this model cross-attends to text states of width "
                                       f"{spec.cross_attention_dim}: expected a ({b}, tokens, "
                                       f"{spec.cross_attention_dim}) tensor, found None")
            ctx = self._states(ctx, b, "encoder_hidden_states")
            cond["encoder_hidden_states"] = ctx
            if guided:
                if neg_ctx is None:
                    raise BadArgumentError("cfg_scale != 1 (or a CFG++ sampler) on a text model needs "
                                           "negative_encoder_hidden_states (the encoded empty / negative prompt)")
                neg_ctx = self._states(neg_ctx, b, "negative_encoder_hidden_states")
                if neg_ctx.shape[1] != ctx.shape[1]:  # CFG stacks both into one network batch
                    raise BadArgumentError(f"negative_encoder_hidden_states: expected the token count of "
                                           f"encoder_hidden_states ({ctx.shape[1]}), found {neg_ctx.shape[1]} "
                                           f"(shape {tuple(neg_ctx.shape)})")
                uncond["encoder_hidden_states"] = neg_ctx
        elif ctx is not None:
            raise BadArgumentError("encoder_hidden_states were given, but this model has no cross-attention")
        if guided and not uncond:
            raise BadArgumentError("cfg_scale != 1 needs a conditional model (class labels or text states)"
                                   + (": this one is unconditional, and its class_labels steer the classifier alone"
                                      if self.classifier is not None else ""))
        return cond, uncond

    def guides(self, sampler, cfg_scale: float) -> bool:
        """Whether a run of ``sampler`` at ``cfg_scale`` makes the unconditional pass (classifier-free guidance): at
        any scale but 1, and at 1 too for a CFG++ sampler where the model has an unconditional input (text states,
        or a class table with a null label) to give it. The CLI, ``bench`` and the Engine ask the same."""
        from .cfg_pp import guides

        has_uncond = bool(self.spec.cross_attention_dim) or (bool(self.spec.num_classes)
                                                             and self.spec.null_class is not None)
        return guides(sampler if has_uncond else None, cfg_scale)

    def _states(self, t, b, name):
        t = torch.as_tensor(t)
        finite_host_values(name, t)
        t = t.to(self.device)
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3 or t.shape[-1] != self.spec.cross_attention_dim or t.shape[0] not in (1, b):
            raise BadArgumentError(f"{name}: expected shape ({b}, tokens, {self.spec.cross_attention_dim}), "
                                   f"found {tuple(t.shape)}")
        if not t.is_floating_point():
            raise BadArgumentError(f"{name}: expected a floating-point tensor (encoded text), found {t.dtype}")
        t = t.to(self._network_dtype())
        return t.expand(b, -1, -1) if t.shape[0] == 1 and b > 1 else t

    def _network_dtype(self) -> torch.dtype:
        if self.config is not None and self.config.torch_dtype is not None:
            return self.config.torch_dtype
        return self.dtype

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters()) if self.model is not None else 0
        return (f"Pipeline({self.spec.kind}, {n / 1e6:.2f}M params, {self.dtype}, {self.device}, "
                f"prediction={self.spec.prediction_type}, source={self.spec.source!r})")


def _sample_plan(plan, denoiser, latents, cond: dict, noise, callback=None) -> torch.Tensor:
    """``plan.sample`` with inpainting's known region (a regular model's: ``fastdiff.inpaint.KnownRegion``) taken
    out of the conditioning, where it travels so that a captured loop reads its tensors from static inputs."""
    known = cond.get(KNOWN_REGION)
    if known is not None:
        from .inpaint import KnownRegion

        cond = {k: v for k, v in cond.items() if k != KNOWN_REGION}
        known = KnownRegion(**known, time_frame=plan.time_frame)
    return plan.sample(denoiser, latents, extra_args=cond, noise=noise, callback=callback, known=known)


def _rows(t: torch.Tensor, start: int, count: int, batch: int) -> torch.Tensor:
    """Rows [start, start+count) of a per-sample tensor; tensors not batched per sample pass through."""
    return t[start:start + count] if t.dim() > 0 and t.shape[0] == batch else t


def _per_sample_numbers(name: str, value, b: int) -> list:
    """``generate``'s cfg_scale / guidance_rescale as one float per sample: a number, or 1 or ``b`` of them (a list,
    an array, a tensor)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return [finite_number(name, value)] * b
    try:
        raw = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise BadArgumentError(f"{name}: expected a finite number, or one per sample, found {value!r}") from None
    # a bool is no number here, also among numbers (where the list's dtype no longer shows it)
    bools = raw.dtype == torch.bool or (isinstance(value, (list, tuple))
                                        and any(type(v).__name__ in ("bool", "bool_") for v in value))
    if bools or raw.is_complex() or raw.dim() > 1 or raw.numel() not in (1, b):
        raise BadArgumentError(f"{name}: expected a finite number, or {b} of them (one per sample), found {value!r}")
    values = [finite_number(name, v) for v in raw.to(torch.float64).reshape(-1).tolist()]
    return values * b if len(values) == 1 else values


def check_seed(seed: int) -> int:
    """``seed`` if a torch.Generator takes it (what ``generate`` and the Engine accept), else a clear error."""
    if not 0 <= seed < 2**63:
        raise BadArgumentError(f"seed: expected an integer in [0, 2**63), found {seed}")
    return seed


def _as_latents(latents) -> Optional[torch.Tensor]:
    """``latents`` as a 4-d tensor: a NumPy array is taken like a tensor; anything else is refused here, before
    its batch and size are read."""
    if latents is None:
        return None
    if not torch.is_tensor(latents):
        import numpy as np

        if not isinstance(latents, np.ndarray):
            raise BadArgumentError(f"latents: expected a (B, C, H, W) torch tensor or NumPy array, found "
                                   f"{type(latents).__name__}")
        latents = torch.from_numpy(np.array(latents, dtype=np.float32))  # a copy: any strides, writable
    if latents.dim() != 4:
        raise BadArgumentError(f"latents: expected a (B, C, H, W) tensor, found shape {tuple(latents.shape)}")
    if not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):  # (an all-NaN sample, else)
        raise BadArgumentError("latents: expected finite float values, found " + (
            str(latents.dtype) if not latents.is_floating_point() else "NaN or inf"))
    return latents


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc="sampling", unit="step", disable=None, leave=False)


def _to_output(x: torch.Tensor, output_type: str) -> Union[torch.Tensor, list]:
    if output_type == "tensor":
        return x
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
    if output_type == "np":
        return img
    from PIL import Image

    if img.shape[-1] not in (1, 3):
        raise BadArgumentError(f"output_type='pil' needs 1 or 3 channels, found {img.shape[-1]} (latents: decode "
                               f"them with a VAE first, or use output_type='tensor')")
    return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in img]
