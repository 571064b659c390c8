"""``fastdiff generate``'s IP-Adapter flags: one adapter or several, their image prompts, scales and masks.

One adapter: ``--ip-adapter FILE --ip-adapter-image A.png [--ip-adapter-image B.png ...]`` (repeated images: their
tokens one after another). Several: repeat ``--ip-adapter``; the k-th ``--ip-adapter-image`` is the k-th adapter's
prompt, several images of one adapter comma-separated (``A.png,B.png``). ``--ip-adapter-scale`` once (every adapter)
or once per adapter; ``--ip-adapter-mask`` as the images (one mask per image, ``none`` for an adapter without
masks).
"""

from __future__ import annotations

import argparse
import os

from ..errors import BadArgumentError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip-adapter", action="append", default=None, metavar="FILE",
                   help="an IP-Adapter's weights (h94/IP-Adapter's ip-adapter_* / ip-adapter-plus_* / "
                        "ip-adapter-full-face_* .safetensors or .bin), its image encoder in image_encoder/ beside the "
                        "first file (or in --ip-adapter-encoder FOLDER); repeat for several adapters")
    p.add_argument("--ip-adapter-encoder", default=None, metavar="FOLDER",
                   help="the IP-Adapter's image encoder (a CLIPVisionModelWithProjection folder)")
    p.add_argument("--ip-adapter-image", action="append", default=None, metavar="IMG.png",
                   help="the image prompt of --ip-adapter (one adapter: repeat for several images, their tokens one "
                        "after another; several adapters: once per adapter, in their order, an adapter's images "
                        "comma-separated)")
    p.add_argument("--ip-adapter-scale", action="append", type=_scale, default=None, metavar="S",
                   help="the image prompt's weight (default 1), or InstantStyle's per-block scales as JSON, e.g. "
                        "'{\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}' (diffusers' set_ip_adapter_scale dict), or a "
                        "JSON list of one scale per masked image; once for every adapter, or once per adapter")
    p.add_argument("--ip-adapter-mask", action="append", default=None, metavar="MASK.png",
                   help="where the image prompt acts (white), one mask per --ip-adapter-image (diffusers' "
                        "ip_adapter_masks); several adapters: once per adapter, comma-separated, 'none' for an adapter "
                        "without masks")


def _scale(text: str):
    """--ip-adapter-scale: a number, or JSON (a per-block object, or a list of per-image scales)."""
    import json

    try:
        return float(text) if not text.lstrip().startswith(("{", "[")) else json.loads(text)
    except ValueError as e:  # (json.JSONDecodeError is a ValueError)
        raise argparse.ArgumentTypeError(f"expected a number or a JSON object of per-block scales, found "
                                         f"{text!r} ({e})") from None


def load(pipe, args) -> None:
    """Load the adapters the flags name (or refuse IP-Adapter flags given without one)."""
    if args.ip_adapter is None:
        given = [f for f, v in (("--ip-adapter-image", args.ip_adapter_image),
                                ("--ip-adapter-encoder", args.ip_adapter_encoder),
                                ("--ip-adapter-scale", args.ip_adapter_scale),
                                ("--ip-adapter-mask", args.ip_adapter_mask)) if v is not None]
        if given:
            raise BadArgumentError(f"{given[0]}: given, but no --ip-adapter FILE")
        return
    if args.ip_adapter_image is None:
        raise BadArgumentError("--ip-adapter: expected --ip-adapter-image IMG.png (the image prompt), found none")
    count = len(args.ip_adapter)
    scales = args.ip_adapter_scale or [1.0]
    if len(scales) not in (1, count):
        raise BadArgumentError(f"--ip-adapter-scale: expected one for every adapter or one per adapter ({count}), "
                               f"found {len(scales)}")
    encoder = args.ip_adapter_encoder
    pipe.load_ip_adapter(args.ip_adapter if count > 1 else args.ip_adapter[0],
                         scale=scales if len(scales) > 1 else scales[0],
                         **({} if encoder is None else dict(image_encoder_folder=os.path.abspath(encoder))))


def inputs(args, read_image) -> dict:
    """generate()'s ip_adapter_image / ip_adapter_masks of the flags (``read_image(path, flag)``: a PIL image)."""
    if args.ip_adapter_image is None:
        return {}
    count = len(args.ip_adapter or [None])
    out = {"ip_adapter_image": _per_adapter(args.ip_adapter_image, count, "--ip-adapter-image", read_image)}
    if args.ip_adapter_mask is not None:
        masks = _per_adapter(args.ip_adapter_mask, count, "--ip-adapter-mask", read_image)
        out["ip_adapter_masks"] = masks if count > 1 else [masks if isinstance(masks, list) else [masks]]
    return out


def _per_adapter(values: list, count: int, flag: str, read_image):
    """One adapter: its images (one, or a list); several: one entry per adapter, each an image, a list of them, or
    None (``none``: masks only)."""
    def read(path):
        return None if flag == "--ip-adapter-mask" and path == "none" else read_image(path, flag)

    if count == 1:
        paths = [p for value in values for p in value.split(",")]
        images = [read(p) for p in paths]
        return images if len(images) > 1 else images[0]
    if len(values) != count:
        raise BadArgumentError(f"{flag}: {count} --ip-adapter given: expected one {flag} each (an adapter's images "
                               f"comma-separated), found {len(values)}")
    entries = []
    for value in values:
        images = [read(p) for p in value.split(",")]
        entries.append(images if len(images) > 1 else images[0])
    return entries
