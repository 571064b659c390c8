"""``fastdiff generate``: sample images from a model and write a PNG grid (or one PNG per image).

    fastdiff generate                                   # the embedded default model (builtin:digits)
    fastdiff generate arch:tiny-unet --steps 10 --n 16 -o grid.png
    fastdiff generate ./dit.pt --class 207 360 --cfg 4 --output-latents latents.safetensors   # one image per label
    fastdiff generate ./sd-folder --prompt "a watercolour fox" --image fox.png --strength 0.6 -o edited.png

Shows the sampling progress bar, then one line of timings:
``load 0.12s | optimise 0.00s | sample 1.23s | decode 0.01s``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from . import generate_ip_adapter

DEFAULT_MODEL = "builtin:digits"


def _registries():
    from ..runtime.config import BACKENDS, DTYPES
    from ..sampling import SAMPLERS, SCHEDULES

    return sorted(SAMPLERS), list(SCHEDULES), list(BACKENDS), list(DTYPES)


def register(sub) -> None:
    samplers, schedules, backends, dtypes = _registries()
    p = sub.add_parser(
        "generate", help="sample images from a model into a PNG grid",
        description="Sample N images from MODEL and write them as one PNG grid (or one PNG per image with "
                    "--separate). Prints a progress bar, then the time spent loading, optimising, sampling "
                    "and decoding.")
    p.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL,
                   help=f"checkpoint path (diffusers / fastdiff folder, DiT .pt, .safetensors), builtin:NAME or "
                        f"arch:NAME (random weights); default: {DEFAULT_MODEL}")
    p.add_argument("-o", "--output", default=None, metavar="OUT.png",
                   help="output PNG (default out.png); with --separate the stem of OUT_0.png, OUT_1.png, ...")
    p.add_argument("--sampler", choices=samplers, default=None,
                   help="sampler (default: the checkpoint's scheduler config; DDIM on its schedule where fastdiff has "
                        "no counterpart of that scheduler)")
    p.add_argument("--sampler-option", dest="sampler_options", action="append", type=_sampler_option, default=None,
                   metavar="KEY=VALUE",
                   help="a sampler option, repeatable (eta=0.5, s_churn=1, order=3, variance=learned_range, ...): "
                        "what the sampler's Python keyword takes; VALUE is read as a Python literal, else a string")
    p.add_argument("--steps", type=int, default=20, metavar="N", help="sampling steps (default 20)")
    p.add_argument("--schedule", choices=schedules, default=None,
                   help="sigma / timestep grid (default: the checkpoint's own timestep spacing)")
    p.add_argument("--cfg", type=float, default=1.0, metavar="G",
                   help="classifier-free guidance scale (default 1: no unconditional pass; class models need --class)")
    p.add_argument("--class", dest="class_labels", type=int, nargs="+", default=None, metavar="C",
                   help="class label(s) for class-conditional models: one for all images or one per image (several "
                        "labels and no --n: one image each); default: the null label, unconditional")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="text models: the prompt of every image, encoded by the model folder's own text encoders")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="text models with --cfg: the negative prompt (default: the empty prompt, or zeros for SDXL)")
    for n, reader in ((2, "SDXL's text_encoder_2, SD3's second CLIP, FLUX.1's T5"), (3, "SD3's T5")):
        p.add_argument(f"--prompt-{n}", default=None, metavar="TEXT",
                       help=f"text models: what the encoder #{n} reads ({reader}; default: --prompt)")
        p.add_argument(f"--negative-prompt-{n}", default=None, metavar="TEXT",
                       help=f"with --cfg: the negative the encoder #{n} reads (default: --negative-prompt)")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="text models: CLIP layers to skip from the end (diffusers' clip_skip)")
    p.add_argument("--guidance", type=float, default=None, metavar="G",
                   help="guidance-distilled models (FLUX.1 dev): the guidance input (default diffusers' for the task: "
                        "3.5; 7 with --image; FLUX.1 Fill's 30)")
    p.add_argument("--n", type=int, default=None, metavar="N",
                   help="number of images (default 4, or one per --class label when several are given)")
    p.add_argument("--image", default=None, metavar="IN.png",
                   help="image-to-image (SDEdit): start from this image (any format Pillow reads; its size is the "
                        "output's, a multiple of the VAE's 8 pixels per latent pixel), noised to --strength; or a "
                        "LATENTS.safetensors a run wrote with --output-latents, taken as latents. A super-resolution "
                        "model upsamples it instead: guided-diffusion's upsamplers 4x by default (or to --height / "
                        "--width), Stable Diffusion's x4 upscaler from latents of the image's size (its VAE's 4x; "
                        "--noise-level)")
    p.add_argument("--controlnet", action="append", default=None, metavar="FOLDER",
                   help="drive the network with a ControlNet (a diffusers ControlNetModel folder for an SD / SDXL "
                        "UNet, SD3ControlNetModel for SD3, FluxControlNetModel for FLUX.1); needs --control-image; "
                        "repeat for several (their outputs add up), each with its own --control-image, in order")
    p.add_argument("--control-image", action="append", default=None, metavar="COND.png",
                   help="with --controlnet: its conditioning image (edges, depth, pose...), not resized: its size is "
                        "the output's, a multiple of 8 pixels per latent pixel")
    p.add_argument("--controlnet-scale", type=float, default=None, metavar="S",
                   help="with --controlnet: the weight of its outputs (diffusers' controlnet_conditioning_scale; "
                        "default: diffusers' for the task: 1, 0.8 with --image, 0.5 with --mask on SD)")
    p.add_argument("--control-start", type=float, default=0.0, metavar="F",
                   help="with --controlnet: the share of the steps before it starts (default 0)")
    p.add_argument("--control-end", type=float, default=1.0, metavar="F",
                   help="with --controlnet: the share of the steps after which it stops (default 1)")
    p.add_argument("--guess-mode", action="store_true",
                   help="with --controlnet: diffusers' guess mode (the ControlNet guides the conditional pass only)")
    p.add_argument("--control-mode", action="append", type=_mode, default=None, metavar="N|none",
                   help="with a FLUX.1 Union ControlNet: its control type (canny, depth, pose, ... as the ControlNet "
                        "numbers them); repeat for several ControlNets, in order ('none' for a plain one)")
    p.add_argument("--control-mask", default=None, metavar="MASK.png",
                   help="with an SD3 inpainting ControlNet: white repaints, black keeps, in its --control-image (read "
                        "in grayscale, at that image's size)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="merge a LoRA (diffusers / PEFT or kohya safetensors, or a folder with diffusers' file) into "
                        "the weights, at SCALE (default 1); repeat for several")
    p.add_argument("--textual-inversion", action="append", default=None, metavar="FILE[:TOKEN]",
                   help="add a textual inversion embedding (diffusers' .bin / .safetensors, A1111's .pt, SDXL's "
                        "clip_l / clip_g pair) to the text encoders, as TOKEN (default: the file's own); repeat for "
                        "several")
    generate_ip_adapter.add_arguments(p)
    p.add_argument("--noise-level", type=int, default=None, metavar="L",
                   help="Stable Diffusion's x4 upscaler: how much noise its --image gets first (default 20, as "
                        "diffusers' StableDiffusionUpscalePipeline)")
    p.add_argument("--classifier", default=None, metavar="FILE",
                   help="classifier guidance (guided-diffusion's classifier_sample.py): a noisy-image classifier "
                        "(its 64x64_classifier.pt ... 512x512_classifier.pt) steers each image to its --class")
    p.add_argument("--classifier-scale", type=float, default=None, metavar="S",
                   help="the classifier's strength (guided-diffusion's --classifier_scale; default 1)")
    p.add_argument("--freeu", type=float, nargs=4, default=None, metavar=("S1", "S2", "B1", "B2"),
                   help="FreeU on a text UNet, as diffusers' enable_freeu (SD 1.5: 0.9 0.2 1.5 1.6)")
    p.add_argument("--mask", default=None, metavar="MASK.png",
                   help="with --image: inpaint; white repaints, black keeps (read in grayscale, at --image's size). "
                        "An inpainting UNet reads it; any other model has the kept part pasted back after each step")
    p.add_argument("--padding-mask-crop", type=int, default=None, metavar="PX",
                   help="with --mask: inpaint only a box around the mask, PX pixels wider on each side, at the model's "
                        "size (or --height / --width), and paste it back into --image (diffusers' padding_mask_crop); "
                        "the PNG keeps --image's size")
    p.add_argument("--strength", type=float, default=None, metavar="S",
                   help="with --image: the share of the steps that run, in (0, 1] (default: the model's diffusers "
                        "img2img pipeline's: 0.8 SD, 0.3 SDXL, 0.6 SD3 / FLUX.1); 1 keeps nothing of the image")
    p.add_argument("--denoising-end", type=float, default=None, metavar="F",
                   help="SDXL's ensemble of experts, the base: stop where the fraction F of the denoising is done "
                        "and write the noisy latents there (--output-latents) for a refiner")
    p.add_argument("--denoising-start", type=float, default=None, metavar="F",
                   help="SDXL's ensemble of experts, the refiner: start where the fraction F is done, from "
                        "--image LATENTS.safetensors (a base run's --output-latents), unnoised")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of image 0; image i uses S+i (default 0)")
    p.add_argument("--height", type=int, default=None, metavar="H",
                   help="sample height in the network's own pixels: a latent model's latents, the image being that "
                        "times the VAE's factor (8 for SD: --height 64 makes 512 pixels); default: the model's")
    p.add_argument("--width", type=int, default=None, metavar="W",
                   help="sample width, as --height (default: the model's)")
    p.add_argument("--backend", choices=backends, default=None,
                   help="runtime backend; asked for explicitly it must run here or the command fails "
                        "(default: eager)")
    p.add_argument("--kernel-ops", choices=["measured", "all", "tune"], default=None,
                   help="with --backend triton: which kernel each fused op runs: the per-op table measured on a GPU "
                        "(default), every op on Triton, or 'tune' (each layer times its kernels on its first call "
                        "and keeps the fastest)")
    p.add_argument("--tune-cache", default=None, metavar="FILE.json",
                   help="with --kernel-ops tune: a timing cache kept between runs (read first, then updated)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="network precision (default: the checkpoint's)")
    p.add_argument("--device", default=None, metavar="DEV", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--separate", action="store_true", help="one PNG per image instead of a grid")
    p.add_argument("--output-latents", default=None, metavar="OUT.safetensors",
                   help="also write the raw samples (B, C, H, W float32) as safetensors key 'latents'; a latent "
                        "model without a VAE (--vae FOLDER, or its folder's vae/) writes only these")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode (and encode --image) in overlapping tiles, as diffusers' vae.enable_tiling(): memory "
                        "of one tile whatever the size, seams blended (the result differs slightly near them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_load_arguments(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------------
# Shared with `fastdiff bench`
# ---------------------------------------------------------------------------------------------------

def default_device(device=None):
    import torch

    from ..errors import BadArgumentError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise BadArgumentError(f"--device: expected a torch device (cpu, cuda, cuda:1), found {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise BadArgumentError(f"--device: expected cpu or cuda[:N], found {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadArgumentError(f"--device {device}: torch sees no CUDA device here")
    return dev


# --scheduler's named presets (fastdiff.checkpoints.presets)
SCHEDULER_PRESETS = {"sit": "SIT_SCHEDULER", "guided-diffusion-cosine": "GUIDED_DIFFUSION_COSINE_SCHEDULER",
                     "improved-diffusion": "IMPROVED_DIFFUSION_SCHEDULER"}


def add_load_arguments(p) -> None:
    """The fastdiff.load options the weights of some formats cannot say (generate, export and bench)."""
    g = p.add_argument_group("loading (what some checkpoints cannot say)")
    g.add_argument("--num-heads", type=int, default=None, metavar="N",
                   help="attention heads (official DiT, Stable Diffusion single files, guided-diffusion)")
    g.add_argument("--head-channels", type=int, default=None, metavar="C",
                   help="channels per attention head instead (guided-diffusion's num_head_channels)")
    g.add_argument("--attention-order", choices=("legacy", "new"), default=None,
                   help="guided-diffusion: 'new' for models trained with use_new_attention_order")
    g.add_argument("--no-super-res", dest="super_res", action="store_const", const=False, default=None,
                   help="guided-diffusion: a 6-input-channel UNet is a plain 6-channel model, not an upsampler")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample", "flow_prediction"),
                   default=None, help="what the network predicts, where the checkpoint does not say (default: its "
                                      "config; flow_prediction: a flow-matching network)")
    g.add_argument("--text-encoder", default=None, metavar="FOLDER|none",
                   help="where prompts are encoded: a diffusers pipeline folder's tokenizer*/ + text_encoder*/ "
                        "(default: the model folder's own); none: no text encoders")
    g.add_argument("--vae", default=None, metavar="FOLDER|none",
                   help="a latent model's image decoder: a diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema for DiT); "
                        "default: the one the checkpoint carries (a pipeline's vae/, a single file's "
                        "first_stage_model); 'none' loads none")
    g.add_argument("--scheduler", default=None, metavar="CONFIG|" + "|".join(SCHEDULER_PRESETS),
                   help="a diffusers scheduler_config.json (file or folder) in place of the checkpoint's; 'sit' for a "
                        "SiT checkpoint (an official-DiT file trained as a flow: willisma/SiT); "
                        "'guided-diffusion-cosine' for a cosine-schedule guided-diffusion checkpoint; "
                        "'improved-diffusion' for openai/improved-diffusion's 4000-step cosine models")


def _sampler_option(text: str) -> tuple:
    """``KEY=VALUE`` as (key, value): VALUE a Python literal (0.5, 3, True, [1, 2]; true / false too), else the
    string itself (``variance=learned_range``)."""
    import ast

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a sampler option's name, found {text!r}")
    kinds = _option_kinds()
    if key not in kinds:
        raise argparse.ArgumentTypeError(f"{key!r} is no sampler's option; expected one of {sorted(kinds)}")
    if "Callable" in kinds[key]:
        raise argparse.ArgumentTypeError(f"{key!r} takes a Python function: the Python API's generate({key}=...) "
                                         f"only")
    raw = raw.strip()
    words = {"true": True, "false": False, "none": None, "inf": math.inf, "-inf": -math.inf, "nan": math.nan}
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = words.get(raw.lower(), raw)
    if "Sequence" in kinds[key] and value is not None and not (
            isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in value)):
        raise argparse.ArgumentTypeError(f"{key}: expected a list of numbers ([1, 2.5, ...]), found {raw!r}")
    return key, value


def _option_kinds() -> dict:
    """{option: its annotation} over every sampler (the keys --sampler-option takes)."""
    from ..sampling import SAMPLERS, _option_annotations

    kinds = {}
    for name in SAMPLERS:
        kinds.update(_option_annotations(name))
    return kinds


def _generate_parameters() -> frozenset:
    import inspect

    from ..pipeline import Pipeline

    return frozenset(k for k, p in inspect.signature(Pipeline.generate).parameters.items()
                     if p.kind is not p.VAR_KEYWORD and k != "self")


def load_options(args) -> dict:
    """The fastdiff.load keywords given on the command line (``add_load_arguments``)."""
    names = ("num_heads", "head_channels", "attention_order", "prediction_type", "super_res")
    options = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    vae = getattr(args, "vae", None)
    if vae is not None:
        options["vae"] = False if vae.lower() == "none" else vae
    text_encoder = getattr(args, "text_encoder", None)
    if text_encoder is not None:
        options["text_encoder"] = False if text_encoder.lower() == "none" else text_encoder
    scheduler = getattr(args, "scheduler", None)
    if scheduler in SCHEDULER_PRESETS:
        from ..checkpoints import presets
        options["scheduler"] = dict(getattr(presets, SCHEDULER_PRESETS[scheduler]))
    elif scheduler is not None:
        from ..scheduler_config import load_scheduler_config
        options["scheduler"] = load_scheduler_config(scheduler)
    return options


def load_pipeline(model: str, device, **options):
    """fastdiff.load with the error of a missing default model made actionable."""
    import fastdiff
    from ..checkpoints.presets import builtin_names
    from ..errors import BadArgumentError

    if model == DEFAULT_MODEL and DEFAULT_MODEL.split(":", 1)[1] not in builtin_names():
        raise BadArgumentError(f"the default model {DEFAULT_MODEL} is not shipped in this build; pass MODEL, e.g. "
                               f"arch:tiny-unet (random weights) or a checkpoint path")
    return fastdiff.load(model, device=device, **options)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_grid(images, nrow: int, padding: int = 2):
    """(B, H, W, C) uint8 -> one (rows*(H+p)+p, nrow*(W+p)+p, C) uint8 grid on a black background."""
    import numpy as np

    b, h, w, c = images.shape
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def grid_columns(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))


# ---------------------------------------------------------------------------------------------------

def _validate(args) -> None:
    from ..errors import BadArgumentError
    from ..utils.atomic import check_file_path

    if args.n is None:  # diffusers' DiTPipeline: one image per label
        args.n = len(args.class_labels) if args.class_labels and len(args.class_labels) > 1 else 4
    for name in ("steps", "n"):
        v = getattr(args, name)
        if v < 1:
            raise BadArgumentError(f"--{name}: expected a positive integer, found {v}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise BadArgumentError(f"--{name}: expected a positive integer, found {v}")
    args.output_given = args.output is not None
    if args.output == "":
        raise BadArgumentError("-o/--output: expected a .png file name, found an empty one")
    args.output = args.output or "out.png"
    if not args.output.lower().endswith(".png"):
        raise BadArgumentError(f"-o/--output: expected a .png file name, found {args.output!r}")
    if args.output_latents is not None and not args.output_latents.lower().endswith(".safetensors"):
        raise BadArgumentError(f"--output-latents: expected a .safetensors file name, found {args.output_latents!r}")
    # every file this run may write, checked before any sampling (a folder in the way, a missing one)
    for flag, path in [("-o/--output", p) for p in png_paths(args)] + [("--output-latents", args.output_latents)]:
        if path is not None:
            try:
                check_file_path(path)
            except BadArgumentError as e:
                raise BadArgumentError(f"{flag}: {e}") from None
    if args.kernel_ops is not None and args.backend != "triton":
        raise BadArgumentError(f"--kernel-ops: expected --backend triton (the only backend with a kernel choice), "
                               f"found --backend {args.backend}")
    if args.tune_cache is not None and args.kernel_ops != "tune":
        raise BadArgumentError(f"--tune-cache: expected --kernel-ops tune, found --kernel-ops {args.kernel_ops}")
    if not 0 <= args.seed <= 2**63 - args.n:  # seeds S .. S+n-1, each below 2**63
        raise BadArgumentError(f"--seed: expected an integer in [0, 2**63 - n], found {args.seed}")
    if not math.isfinite(args.cfg):
        raise BadArgumentError(f"--cfg: expected a finite number, found {args.cfg}")
    if args.strength is not None and args.image is None:
        raise BadArgumentError("--strength: given without --image (it is image-to-image's)")
    if args.denoising_start is not None and args.image is None:
        raise BadArgumentError("--denoising-start: given without --image LATENTS.safetensors (a base run's latents)")
    if args.mask is not None and args.image is None:
        raise BadArgumentError("--mask: given without --image; inpainting repaints part of an image")
    if args.padding_mask_crop is not None and args.mask is None:
        raise BadArgumentError("--padding-mask-crop: given without --mask (it crops around the mask)")
    if args.padding_mask_crop is not None and args.output_latents is not None:
        raise BadArgumentError("--output-latents: the latents of a --padding-mask-crop run are the crop's, not the "
                               "image's; write the PNG alone")
    control_flags = [f for f, given in (("--control-image", args.control_image is not None),
                                        ("--control-mode", args.control_mode is not None),
                                        ("--control-mask", args.control_mask is not None),
                                        ("--controlnet-scale", args.controlnet_scale is not None),
                                        ("--control-start", args.control_start != 0.0),
                                        ("--control-end", args.control_end != 1.0), ("--guess-mode", args.guess_mode))
                     if given]
    if args.controlnet is not None and len(args.control_image or []) != len(args.controlnet):
        raise BadArgumentError(f"--controlnet: expected one --control-image COND.png per ControlNet (its conditioning "
                               f"image), found {len(args.controlnet)} ControlNet(s) and "
                               f"{len(args.control_image or [])} image(s)")
    if control_flags and args.control_image is None:
        raise BadArgumentError(f"{control_flags[0]}: given without --control-image COND.png")
    if args.control_image is not None and (args.height is not None or args.width is not None):
        raise BadArgumentError("--height / --width: the --control-image fixes the size")
    for flag, path in (("--image", args.image), ("--mask", args.mask), ("--control-mask", args.control_mask),
                       *(("--control-image", p) for p in args.control_image or [])):
        if path is not None and not os.path.isfile(path):
            raise BadArgumentError(f"{flag}: expected an image file, found {path!r} (no such file)")


def _mode(value: str):
    """--control-mode N or 'none' (a plain ControlNet beside a Union one)."""
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'none', found {value!r}") from None


def _read_latents(path: str):
    """--image LATENTS.safetensors: the 'latents' tensor a run wrote with --output-latents (safetensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import BadArgumentError

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise BadArgumentError(f"--image: could not read {path!r} as safetensors ({e})") from e
    if "latents" not in tensors:
        raise BadArgumentError(f"--image: expected a 'latents' tensor in {path!r} (what --output-latents writes), "
                               f"found {sorted(tensors)}")
    return tensors["latents"]


def _read_image(path: str, flag: str = "--image"):
    """--image (or --mask) as a PIL image (read fully now: the file may change while sampling)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..errors import BadArgumentError

    try:
        with Image.open(path) as im:
            im.load()
            return _eight_bit(ImageOps.exif_transpose(im))  # upright, as viewers and diffusers' load_image show it
    except (OSError, UnidentifiedImageError) as e:
        raise BadArgumentError(f"{flag}: could not read {path!r} as an image ({e})") from e


def _eight_bit(image):
    """A 16-bit grayscale PNG's pixels (Pillow's modes I;16* and I) scaled to 8 bits: generate() takes 8-bit PIL
    images (Pillow's own convert() would clip them at 255), and a command line has no other way to give one."""
    if image.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return image
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(pixels * (255 / 65535)), 0, 255).astype(np.uint8), mode="L")


def _lora_args(values: list) -> list:
    """--lora FILE[:SCALE] values -> [(path, scale)]; a colon followed by no number is part of the path."""
    from ..errors import BadArgumentError

    out = []
    for value in values:
        path, _, scale = value.rpartition(":")
        try:  # (a file whose own name ends in ":<number>" is that file, at scale 1)
            out.append((path, float(scale)) if path and not os.path.exists(os.path.expanduser(value))
                       else (value, 1.0))
        except ValueError:
            out.append((value, 1.0))
        if not os.path.exists(os.path.expanduser(out[-1][0])):
            raise BadArgumentError(f"--lora: expected a LoRA file or folder[:SCALE], found {value!r} (no such file)")
    return out


def _embedding_args(values: list) -> list:
    """--textual-inversion FILE[:TOKEN] values -> [(path, token or None)]: the path is what exists."""
    from ..errors import BadArgumentError

    out = []
    for value in values:
        path, _, token = value.rpartition(":")
        if os.path.isfile(os.path.expanduser(value)) or not path:
            out.append((value, None))
        elif os.path.isfile(os.path.expanduser(path)) and token:
            out.append((path, token))
        else:
            raise BadArgumentError(f"--textual-inversion: expected an embedding file[:TOKEN], found {value!r} (no "
                                   f"such file)")
    return out


def png_paths(args) -> list:
    """The PNG file(s) the run writes: the grid, or one per image with --separate."""
    if args.separate:
        return [f"{args.output[:-4]}_{i}.png" for i in range(args.n)]
    return [args.output]


def run(args) -> int:
    from ..errors import BadArgumentError
    from ..prompts.encoder import EXTRA_PROMPTS
    from ..runtime.config import OptimizeConfig

    _validate(args)
    device = default_device(args.device)
    if args.backend is not None:
        from ..runtime.runners import check_backend

        check_backend(args.backend, device)

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, device, **load_options(args))
    for path, scale in _lora_args(args.lora or []):  # merged before any optimisation, as the weights are
        pipe.load_lora(path, scale=scale)
    for path, token in _embedding_args(args.textual_inversion or []):
        pipe.load_textual_inversion(path, token=token)
    if args.controlnet is not None:
        pipe.set_controlnet(args.controlnet if len(args.controlnet) > 1 else args.controlnet[0])
    control = pipe._control_format()  # (--controlnet's, or the folder's own controlnet/ folders)
    if args.control_image is not None and control is None:
        raise BadArgumentError(f"--control-image: given, but {args.model} has no ControlNet (pass --controlnet FOLDER)")
    if control is not None and len(args.control_image or []) != (getattr(control, "count", None) or 1):
        raise BadArgumentError(f"--control-image: this model is driven by {getattr(control, 'count', None) or 1} "
                               f"ControlNet(s): expected one --control-image COND.png each, found "
                               f"{len(args.control_image or [])}")
    if args.freeu is not None:
        pipe.enable_freeu(*args.freeu)
    generate_ip_adapter.load(pipe, args)
    if args.classifier is not None:  # (64 channels per head, legacy attention order: create_classifier's, whatever
        # the model's)
        pipe.load_classifier(args.classifier, scale=1.0 if args.classifier_scale is None else args.classifier_scale)
    elif args.classifier_scale is not None:
        raise BadArgumentError("--classifier-scale: given, but no --classifier FILE")
    if args.vae_tiling:
        if pipe.vae is None:
            raise BadArgumentError(f"--vae-tiling: {args.model} has no VAE to tile (pass --vae FOLDER)")
        pipe.vae.enable_tiling()
    t_load = time.perf_counter() - t0
    spec = pipe.spec
    if args.image is not None and (args.height is not None or args.width is not None) and (
            args.padding_mask_crop is None) and not spec.low_res_channels:  # (a super-resolution model's output
        raise BadArgumentError("--height / --width: the --image fixes the size")  # size is its own)

    decoded = spec.in_channels not in (1, 3) and pipe.vae is not None  # latents, and a VAE to decode them
    is_image = spec.in_channels in (1, 3) or decoded
    if not is_image and (args.output_latents is None or args.output_given or args.separate):
        given = "-o / --separate ask for PNGs, but " if args.output_latents is not None else ""
        raise BadArgumentError(
            f"{given}this is a latent model ({spec.in_channels} channels) and no VAE decoder came with it: pass --vae "
            f"FOLDER (a diffusers AutoencoderKL folder) to write images, or only --output-latents OUT.safetensors for "
            f"the latents")
    if args.cfg != 1.0 and spec.num_classes and not spec.cross_attention_dim and args.class_labels is None:
        raise BadArgumentError(f"--cfg {args.cfg:g}: guidance on this class-conditional model needs --class (with no "
                               f"label both passes are unconditional, and the result that of --cfg 1 at twice the "
                               f"cost)")
    inputs = {}  # generate()'s text / guidance / image arguments
    if spec.cross_attention_dim:
        if pipe.prompt_encoder is None:
            raise BadArgumentError(
                f"this model is text-conditioned (text width {spec.cross_attention_dim}) and no text encoders came "
                f"with it: pass --text-encoder FOLDER (a diffusers pipeline folder with tokenizer/ and text_encoder/), "
                f"or use the Python API (pipe.generate(encoder_hidden_states=...))")
        if args.prompt is None:
            raise BadArgumentError("--prompt: this model is text-conditioned: expected a prompt, found none")
        if args.negative_prompt is not None and not pipe.guides(args.sampler, args.cfg):
            raise BadArgumentError("--negative-prompt: given, but --cfg 1 runs no unconditional pass; pass --cfg G "
                                   "(or a CFG++ sampler, which runs one at --cfg 1 too)")
        inputs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, clip_skip=args.clip_skip,
                      **{name: getattr(args, name) for name in EXTRA_PROMPTS})
    else:
        given = [f for f, v in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt),
                                ("--clip-skip", args.clip_skip),
                                *(("--" + name.replace("_", "-"), getattr(args, name)) for name in EXTRA_PROMPTS))
                 if v is not None]
        if given:
            raise BadArgumentError(f"{given[0]}: given, but this model ({spec.kind}) is not text-conditioned")
    if args.guidance is not None:
        inputs["guidance"] = args.guidance
    if args.image is not None:
        is_tensor_file = args.image.lower().endswith(".safetensors")  # (as -o takes X.PNG: any case)
        image = _read_latents(args.image) if is_tensor_file else _read_image(args.image)
        if is_tensor_file and spec.in_channels in (1, 3) and pipe.vae is None and \
                -1 <= float(image.min()) and float(image.max()) <= 1:
            # a pixel model's samples, as --output-latents writes them, in [-1, 1]: generate() reads tensors as
            # images in [0, 1] (in [-1, 1] only when a value is negative, with a warning); a state beyond [-1, 1]
            # (a --denoising-end run's) goes as it is, and generate() says what it expects
            image = (image.float() + 1) / 2
        inputs.update(image=image, strength=args.strength)
    for name in ("denoising_end", "denoising_start"):
        if getattr(args, name) is not None:
            inputs[name] = getattr(args, name)
    if args.mask is not None:
        inputs["mask_image"] = _read_image(args.mask, "--mask")
    if args.padding_mask_crop is not None:  # (generate() pastes the crop back into PIL images)
        inputs.update(padding_mask_crop=args.padding_mask_crop, output_type="pil")
    inputs.update(generate_ip_adapter.inputs(args, _read_image, pipe))
    for key, value in args.sampler_options or ():
        if key in _generate_parameters():  # (generate's own arguments have flags of their own)
            raise BadArgumentError(f"--sampler-option {key}=...: {key!r} is an argument of generate(), not a sampler "
                                   f"option; expected a sampler's option (eta, s_churn, order, variance, ...)")
        if key in inputs:
            raise BadArgumentError(f"--sampler-option {key}: given twice; expected one value")
        inputs[key] = value
    if args.control_image is not None:
        images = [_read_image(path, "--control-image") for path in args.control_image]
        inputs.update(control_image=images if len(images) > 1 else images[0],
                      controlnet_conditioning_scale=args.controlnet_scale, control_guidance_start=args.control_start,
                      control_guidance_end=args.control_end, guess_mode=args.guess_mode)
        if args.control_mask is not None:  # (an SD3 inpainting ControlNet's)
            inputs["control_mask"] = _read_image(args.control_mask, "--control-mask")
        if args.control_mode is not None:  # (a FLUX.1 Union ControlNet's control type; one per ControlNet)
            inputs["control_mode"] = args.control_mode if len(args.control_mode) > 1 else args.control_mode[0]

    t0 = time.perf_counter()
    if args.backend is not None or args.dtype is not None:
        pipe.optimize(OptimizeConfig(backend=args.backend or "eager", dtype=args.dtype,
                                     kernel_ops=args.kernel_ops or "measured", tune_cache=args.tune_cache))
    sync(device)
    t_opt = time.perf_counter() - t0

    if args.noise_level is not None:
        inputs["noise_level"] = args.noise_level
    t0 = time.perf_counter()
    inputs.setdefault("output_type", "tensor")
    x = pipe.generate(n=args.n, steps=args.steps, sampler=args.sampler, schedule=args.schedule, cfg_scale=args.cfg,
                      class_labels=args.class_labels, seed=args.seed, height=args.height, width=args.width,
                      progress=not args.no_progress, **inputs)
    sync(device)
    t_sample = time.perf_counter() - t0

    t0 = time.perf_counter()
    if inputs["output_type"] == "pil":  # (decoded and pasted back already)
        x = images = _signed_pixels(x)
    else:
        images = pipe.decode(x) if decoded else x
    try:
        written = _write_outputs(args, x, images, is_image)
    except (OSError, RuntimeError) as e:  # a folder that exists but refuses files (/proc); safetensors' own errors
        raise BadArgumentError(f"cannot write the output: {e}") from e
    t_decode = time.perf_counter() - t0

    for note in pipe.notes:
        print(f"note: {note}", file=sys.stderr)
    for path in written:
        print(path)
    print(f"load {t_load:.2f}s | optimise {t_opt:.2f}s | sample {t_sample:.2f}s | decode {t_decode:.2f}s")
    return 0


def _signed_pixels(pictures: list):
    """PIL images (one size) -> (B, 3, H, W) in [-1, 1], which the PNG writer turns back into the same bytes."""
    import numpy as np
    import torch

    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))) for im in pictures]).permute(
        0, 3, 1, 2).float() / 127.5 - 1


def _write_outputs(args, x, images, is_image: bool) -> list:
    """Write the latents file (``x``) and / or the PNG(s) (``images`` in [-1, 1]); returns the paths written. Every
    file is written to a temp name first and renamed only once all are written: a write that fails (or is
    interrupted) leaves the earlier files of the run unwritten, not an old PNG beside new latents."""
    import contextlib

    import torch

    from ..utils.atomic import atomic_path

    written = []
    with contextlib.ExitStack() as stack:  # (each atomic_path renames its file as the stack closes)
        if args.output_latents is not None:
            from safetensors.torch import save_file

            tmp = stack.enter_context(atomic_path(args.output_latents, suffix=".safetensors"))
            save_file({"latents": x.detach().float().cpu().contiguous()}, tmp,
                      metadata={"source": str(args.model), "steps": str(args.steps), "seed": str(args.seed)})
            written.append(args.output_latents)
        if is_image:
            from PIL import Image

            imgs = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            mode = lambda a: a[..., 0] if a.shape[-1] == 1 else a  # noqa: E731
            pictures = imgs if args.separate else [make_grid(imgs, grid_columns(len(imgs)))]
            for path, picture in zip(png_paths(args), pictures):
                tmp = stack.enter_context(atomic_path(path, suffix=".png"))  # (no truncated PNG, ever)
                Image.fromarray(mode(picture)).save(tmp, format="PNG")
                written.append(path)
    return written
