"""``fastdiff generate``'s IP-Adapter flags: one adapter or several, their image prompts, scales and masks.

One adapter: ``--ip-adapter FILE --ip-adapter-image A.png [--ip-adapter-image B.png ...]`` (repeated images: their
tokens one after another; paths taken as they are). Several: repeat ``--ip-adapter``; the k-th ``--ip-adapter-image``
is the k-th adapter's prompt, several images of one adapter comma-separated (``A.png,B.png``).
``--ip-adapter-scale`` once (every adapter) or once per adapter; ``--ip-adapter-mask`` as the images (one mask per
image; with several adapters ``none`` for an adapter without masks). ``--ip-adapter-embeds`` gives an adapter's
features in place of images (IP-Adapter Face ID's face embeddings), once per adapter with several (features for every
adapter, as diffusers, or images for every adapter); IP-Adapter Face ID Plus takes both: the face embeddings and the
face crop (``--ip-adapter-image``; beside other adapters ``none`` for those, which take their features alone).
"""

from __future__ import annotations

import argparse
import os

from ..errors import BadArgumentError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip-adapter", action="append", default=None, metavar="FILE",
                   help="an IP-Adapter's weights (h94/IP-Adapter's ip-adapter_* / ip-adapter-plus_* / "
                        "ip-adapter-full-face_* .safetensors or .bin, or IP-Adapter-FaceID's ip-adapter-faceid_* with "
                        "--ip-adapter-embeds), its image encoder in image_encoder/ beside the first file (or in "
                        "--ip-adapter-encoder FOLDER); repeat for several adapters")
    p.add_argument("--ip-adapter-encoder", default=None, metavar="FOLDER",
                   help="the IP-Adapter's image encoder (a CLIPVisionModelWithProjection folder)")
    p.add_argument("--ip-adapter-image", action="append", default=None, metavar="IMG.png",
                   help="the image prompt of --ip-adapter (one adapter: repeat for several images, their tokens one "
                        "after another; several adapters: once per adapter, in their order, an adapter's images "
                        "comma-separated; with --ip-adapter-embeds, a Face ID Plus adapter's face crop, 'none' for "
                        "the others)")
    p.add_argument("--ip-adapter-embeds", action="append", default=None, metavar="EMBEDS.safetensors",
                   help="an adapter's image features in place of --ip-adapter-image (several adapters: once per "
                        "adapter, in their order): a safetensors file holding one "
                        "tensor, (N, D) / (B, N, D) embeddings (IP-Adapter Face ID: insightface's face embeddings) or "
                        "(N, S, E) hidden states (Plus, Full Face); the unconditional pass as for an image. IP-Adapter "
                        "Face ID Plus takes the face embeddings here and the face crop as --ip-adapter-image")
    p.add_argument("--ip-adapter-scale", action="append", type=_scale, default=None, metavar="S",
                   help="the image prompt's weight (default 1), or InstantStyle's per-block scales as JSON, e.g. "
                        "'{\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}' (diffusers' set_ip_adapter_scale dict), or a "
                        "JSON list of one scale per masked image; once for every adapter, or once per adapter")
    p.add_argument("--ip-adapter-mask", action="append", default=None, metavar="MASK.png",
                   help="where the image prompt acts (white), one mask per image (of --ip-adapter-image, or per N "
                        "of --ip-adapter-embeds), given as the images are (diffusers' ip_adapter_masks); several "
                        "adapters: once per adapter, comma-separated, 'none' for an adapter without masks")


def _scale(text: str):
    """--ip-adapter-scale: a number, or JSON (a per-block object, or a list of per-image scales)."""
    import json

    try:
        return float(text) if not text.lstrip().startswith(("{", "[")) else json.loads(text)
    except ValueError as e:  # (json.JSONDecodeError is a ValueError)
        raise argparse.ArgumentTypeError(f"expected a number, or JSON: a per-block object or a list of per-image "
                                         f"scales, found {text!r} ({e})") from None


def load(pipe, args) -> None:
    """Load the adapters the flags name (or refuse IP-Adapter flags given without one)."""
    if args.ip_adapter is None:
        given = [f for f, v in (("--ip-adapter-image", args.ip_adapter_image),
                                ("--ip-adapter-embeds", args.ip_adapter_embeds),
                                ("--ip-adapter-encoder", args.ip_adapter_encoder),
                                ("--ip-adapter-scale", args.ip_adapter_scale),
                                ("--ip-adapter-mask", args.ip_adapter_mask)) if v is not None]
        if given:
            raise BadArgumentError(f"{given[0]}: given, but no --ip-adapter FILE")
        return
    count = len(args.ip_adapter)
    if args.ip_adapter_image is None and args.ip_adapter_embeds is None:
        raise BadArgumentError("--ip-adapter: expected --ip-adapter-image IMG.png (the image prompt) or "
                               "--ip-adapter-embeds (both for IP-Adapter Face ID Plus), found neither")
    if args.ip_adapter_embeds is not None and len(args.ip_adapter_embeds) != count:
        raise BadArgumentError(f"--ip-adapter-embeds: {count} --ip-adapter given: expected one --ip-adapter-embeds "
                               f"each (a file of that adapter's features), found {len(args.ip_adapter_embeds)}")
    if args.ip_adapter_image is not None and "none" in args.ip_adapter_image and (
            count == 1 or args.ip_adapter_embeds is None):
        raise BadArgumentError("--ip-adapter-image: 'none' marks an adapter that takes its features alone, among "
                               "several --ip-adapter with --ip-adapter-embeds (IP-Adapter Face ID Plus's crop beside "
                               "them)")
    for flag, values in (("--ip-adapter-image", args.ip_adapter_image), ("--ip-adapter-mask", args.ip_adapter_mask)):
        if count > 1 and values is not None and len(values) != count:  # (before anything loads)
            raise BadArgumentError(f"{flag}: {count} --ip-adapter given: expected one {flag} each (an adapter's "
                                   f"images comma-separated), found {len(values)}")
    _check_none(args.ip_adapter_mask or [], count)
    _check_none(args.ip_adapter_image or [], count, "--ip-adapter-image", "images (one that takes its features "
                                                                          "alone)")
    scales = args.ip_adapter_scale or [1.0]
    if len(scales) not in (1, count):
        raise BadArgumentError(f"--ip-adapter-scale: expected one for every adapter or one per adapter ({count}), "
                               f"found {len(scales)}")
    folder = None if args.ip_adapter_encoder is None else os.path.abspath(args.ip_adapter_encoder)
    first = os.path.abspath(args.ip_adapter[0])
    beside = os.path.join(first if os.path.isdir(first) else os.path.dirname(first), "image_encoder")
    if folder is None and args.ip_adapter_image is None and not os.path.isdir(beside):
        encoder = dict(image_encoder_folder=None)  # (features given: an encoder only for Plus's black image)
    else:
        encoder = {} if folder is None else dict(image_encoder_folder=folder)
    # (one scale per adapter, always as a list: a JSON list given once is one adapter's per-image scales)
    pipe.load_ip_adapter(args.ip_adapter if count > 1 else args.ip_adapter[0],
                         scale=scales if len(scales) == count else scales * count, **encoder)


def inputs(args, read_image, pipe=None) -> dict:
    """generate()'s ip_adapter_image (or ip_adapter_image_embeds) / ip_adapter_masks of the flags
    (``read_image(path, flag)``: a PIL image; ``pipe``: the loaded pipeline, which completes several adapters'
    features with their unconditional pass, diffusers' list form)."""
    if args.ip_adapter_image is None and args.ip_adapter_embeds is None:
        return {}
    count = len(args.ip_adapter or [None])
    out = {}  # (both for Face ID Plus: the face embeddings and the crop; the pipeline refuses both for another kind)
    if args.ip_adapter_embeds is not None:  # (one file per adapter: load() checked the count)
        embeds = [_read_embeds(path) for path in args.ip_adapter_embeds]
        out["ip_adapter_image_embeds"] = embeds[0] if count == 1 else \
            pipe.ip_adapter_embeds_list(embeds, guided=pipe.guides(args.sampler, args.cfg))
    if args.ip_adapter_image is not None:
        out["ip_adapter_image"] = _per_adapter(args.ip_adapter_image, count, "--ip-adapter-image", read_image)
    if args.ip_adapter_mask is not None:
        masks = _per_adapter(args.ip_adapter_mask, count, "--ip-adapter-mask", read_image)
        out["ip_adapter_masks"] = masks if count > 1 else [masks if isinstance(masks, list) else [masks]]
    return out


def _per_adapter(values: list, count: int, flag: str, read_image):
    """One adapter: its images (one, or a list: the repeated flags, paths as they are); several: one entry per
    adapter, each an image, a list of them (comma-separated), or None (masks: ``none``)."""
    if count == 1:
        images = [read_image(path, flag) for path in values]
        return images if len(images) > 1 else images[0]
    entries = []  # (one value per adapter: load() checked the counts)
    for value in values:
        if value == "none":  # (an adapter without masks; one whose features come alone, load() checked)
            entries.append(None)
            continue
        images = [read_image(path, flag) for path in value.split(",")]
        entries.append(images if len(images) > 1 else images[0])
    return entries


def _check_none(values: list, count: int, flag: str = "--ip-adapter-mask", what: str = "masks") -> None:
    """'none' (an adapter without masks) only as a whole --ip-adapter-mask among several adapters; for
    --ip-adapter-image (load() checks where it may stand at all) only as a whole value."""
    if count == 1 and flag == "--ip-adapter-mask" and "none" in values:
        raise BadArgumentError("--ip-adapter-mask: 'none' marks an adapter without masks among several --ip-adapter; "
                               "with one adapter leave the flag out")
    for value in values:
        if count > 1 and value != "none" and "none" in value.split(","):
            raise BadArgumentError(f"{flag}: 'none' stands for a whole adapter's {what}, found it among {value!r}")


def _read_embeds(path: str):
    """--ip-adapter-embeds: the one tensor of a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise BadArgumentError(f"--ip-adapter-embeds: could not read {path!r} as safetensors ({e})") from e
    if len(tensors) != 1:
        raise BadArgumentError(f"--ip-adapter-embeds: expected one tensor in {path!r}, found {sorted(tensors)}")
    return next(iter(tensors.values()))
