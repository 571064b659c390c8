"""NVlabs/edm checkpoints -> fastdiff's native EDM UNets (``fastdiff.models.edm``).

The format read here is a plain ``EDMPrecond.state_dict()`` (every key ``model.<inner key>``), saved with
``torch.save`` (or as safetensors). EDM's own release format, a ``torch_utils.persistence`` pickle of the
whole module, needs arbitrary code to unpickle and is refused by ``read_torch_file``; convert it once
where EDM's code is installed: ``torch.save(pickle.load(f)['ema'].state_dict(), 'edm.pt')``.

The inner key layout IS the native one: loading strips ``model.`` and nothing else. The config comes
from the keys and shapes:

* ``model_type``: ``out_conv.weight`` (DhariwalUNet) or ``dec.*_aux_conv.weight`` (SongUNet).
* ``img_resolution`` / ``in_channels``: the ``enc.{R}x{R}_conv`` input conv (its name and input width).
* levels, ``num_blocks``, ``channel_mult``: the ``dec.{r}x{r}_block{i}`` names and output widths.
* ``model_channels`` / ``channel_mult_emb`` / ``channel_mult_noise``: the input conv width (SongUNet) or
  the noise-embedding width (DhariwalUNet), and ``map_layer0``'s shape.
* ``attn_resolutions``: the resolutions whose encoder / decoder blocks hold ``qkv`` weights. For
  DhariwalUNet (64 channels per head) a level narrower than 64 channels has no attention weights even if
  the training config listed it: it is left out, which builds the same network.
* ``label_dim`` / ``augment_dim``: ``map_label`` / ``map_augment`` input widths (0 when absent).
* SongUNet's ``embedding_type`` (``map_noise.freqs``: Fourier), ``encoder_type`` (``enc.*_aux_skip`` /
  ``enc.*_aux_residual``), ``decoder_type`` (aux convs above the top level) and ``resample_filter`` (the
  taps recovered from any ``resample_filter`` buffer, normalised to a first tap of 1).

Not in the weights, defaulted: ``dropout`` (0.10) and ``label_dropout`` (0): training-only. The
preconditioning constants (sigma_data 0.5, sigma_min / sigma_max) are not stored either: ``edm_spec``
uses EDM's defaults for sampling (sigma 0.002 .. 80, rho 7).
"""

from __future__ import annotations

import re

import torch

from ..errors import UnknownFormatError, UnsupportedConfigError
from ..models.edm import EDMUNetConfig
from ..spec import ModelSpec
from .io import read_safetensors, read_torch_file

PREFIX = "model."
_MARKERS = ("map_layer0.weight", "map_layer1.weight")
_ENC_CONV = re.compile(r"enc\.(\d+)x\1_conv\.weight$")
_DEC_BLOCK = re.compile(r"dec\.(\d+)x\1_block(\d+)\.conv0\.weight$")
_QKV = re.compile(r"(enc|dec)\.(\d+)x\2_block\d+\.qkv\.weight$")

# EDM's sampler defaults (generate.py edm_sampler) and EDMPrecond's sigma_data.
EDM_SCHEDULER = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
                 "rho": 7.0}


def _inner(sd: dict) -> dict:
    """The inner network's keys: ``model.`` stripped when every key carries it."""
    if sd and all(isinstance(k, str) and k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX):]: v for k, v in sd.items()}
    return sd


def is_edm_state_dict(sd) -> bool:
    """True for an EDMPrecond state dict (``model.`` prefix) or its inner SongUNet / DhariwalUNet one."""
    if not isinstance(sd, dict) or not sd:
        return False
    inner = _inner(sd)
    return all(k in inner for k in _MARKERS) and any(_ENC_CONV.match(k) for k in inner) \
        and any(_DEC_BLOCK.match(k) for k in inner) \
        and ("out_conv.weight" in inner or any(k.endswith("_aux_conv.weight") for k in inner))


def _filter_taps(f2d: torch.Tensor) -> list:
    """1-D taps of a (1, 1, k, k) outer(f, f) / sum(f)^2 buffer, scaled so the first tap is 1."""
    row = f2d.reshape(f2d.shape[-2], f2d.shape[-1])[0].double()
    taps = (row / row[0]).tolist()
    return [int(round(t)) if abs(t - round(t)) < 1e-6 else t for t in taps]


def edm_config_from_state_dict(sd: dict, dropout: float = 0.10, label_dropout: float = 0.0) -> EDMUNetConfig:
    """Infer the EDMUNetConfig from an EDM state dict (with or without the ``model.`` prefix); see the
    module docstring for what each field is read from. ``dropout`` / ``label_dropout`` are not in the
    weights (training-only) and are recorded as given."""
    if not is_edm_state_dict(sd):
        keys = sorted(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
        raise UnknownFormatError(f"not an EDM state dict: expected {list(_MARKERS)}, an enc.RxR_conv input conv, "
                                 f"dec.RxR_block<i> blocks and out_conv or aux_conv output convs; found {keys}...")
    sd = _inner(sd)
    model_type = "DhariwalUNet" if "out_conv.weight" in sd else "SongUNet"

    convs = [(int(m.group(1)), k) for k in sd if (m := _ENC_CONV.match(k))]
    if len(convs) != 1:
        raise UnsupportedConfigError("enc.RxR_conv", [k for _, k in convs], supported="exactly one input conv",
                                     model="EDM UNet")
    img_resolution, conv_key = convs[0]
    in_channels, conv_out = int(sd[conv_key].shape[1]), int(sd[conv_key].shape[0])

    blocks: dict[int, dict[int, int]] = {}  # res -> {idx: out channels}
    for k in sd:
        if m := _DEC_BLOCK.match(k):
            blocks.setdefault(int(m.group(1)), {})[int(m.group(2))] = int(sd[k].shape[0])
    resolutions = sorted(blocks, reverse=True)
    expected = [img_resolution >> i for i in range(len(resolutions))]
    if resolutions != expected:
        raise UnsupportedConfigError("decoder resolutions", resolutions, supported=f"{expected} (one halving per "
                                     f"level from the input conv's {img_resolution})", model="EDM UNet")
    counts = {len(b) for b in blocks.values()}
    if len(counts) != 1:
        raise UnsupportedConfigError("num_blocks", {r: len(b) for r, b in blocks.items()},
                                     supported="the same number of decoder blocks at every level", model="EDM UNet")
    num_blocks = counts.pop() - 1
    widths = [blocks[r][0] for r in resolutions]

    noise_channels, emb_channels = (int(s) for s in sd["map_layer0.weight"].shape[::-1])
    model_channels = noise_channels if model_type == "DhariwalUNet" else conv_out
    for name, value in (("channel_mult", widths), ("channel_mult_emb", emb_channels),
                        ("channel_mult_noise", noise_channels)):
        if any(v % model_channels for v in (value if isinstance(value, list) else [value])):
            raise UnsupportedConfigError(name, value, supported=f"multiples of model_channels={model_channels}",
                                         model="EDM UNet")

    attn = sorted({int(m.group(2)) for k in sd if (m := _QKV.match(k))}, reverse=True)
    song = {}
    if model_type == "SongUNet":
        filters = [v for k, v in sd.items() if k.endswith(".resample_filter")]
        aux_convs = [k for k in sd if re.match(r"dec\.(\d+)x\1_aux_conv\.weight$", k)]
        song = dict(
            embedding_type="fourier" if "map_noise.freqs" in sd else "positional",
            channel_mult_noise=noise_channels // model_channels,
            encoder_type="residual" if any("_aux_residual." in k for k in sd)
            else "skip" if any("_aux_skip." in k for k in sd) else "standard",
            decoder_type="skip" if len(aux_convs) > 1 else "standard",
            resample_filter=_filter_taps(filters[0]) if filters else [1, 1],
        )
        out_channels = int(sd[f"dec.{img_resolution}x{img_resolution}_aux_conv.weight"].shape[0])
    else:
        out_channels = int(sd["out_conv.weight"].shape[0])
    return EDMUNetConfig(
        model_type=model_type,
        img_resolution=img_resolution,
        in_channels=in_channels,
        out_channels=out_channels,
        label_dim=int(sd["map_label.weight"].shape[1]) if "map_label.weight" in sd else 0,
        augment_dim=int(sd["map_augment.weight"].shape[1]) if "map_augment.weight" in sd else 0,
        model_channels=model_channels,
        channel_mult=[w // model_channels for w in widths],
        channel_mult_emb=emb_channels // model_channels,
        num_blocks=num_blocks,
        attn_resolutions=attn,
        dropout=dropout,
        label_dropout=label_dropout,
        **song,
    )


def load_edm(path: str) -> tuple[EDMUNetConfig, dict]:
    """Read a plain EDMPrecond state dict (torch file or safetensors): (config, inner state dict with
    ``model.`` stripped), ready for ``strict_load(EDMUNet(config) on meta, state_dict)``."""
    sd = read_safetensors(path) if path.endswith(".safetensors") else read_torch_file(path)
    if not is_edm_state_dict(sd):
        found = sorted(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
        raise UnknownFormatError(f"{path} is not an EDM checkpoint: expected a plain EDMPrecond state dict "
                                 f"(model.map_layer0.weight, model.enc.RxR_conv.weight, ...), found {found}")
    sd = _inner(sd)
    return edm_config_from_state_dict(sd), sd


def edm_spec(config: EDMUNetConfig, source: str = "") -> ModelSpec:
    """Sampling facts of an EDM network: EDM preconditioning, EDM's Heun / Euler defaults, no null class
    (EDM has no classifier-free guidance label)."""
    return ModelSpec(
        kind="edm",
        model_config=config.to_dict(),
        prediction_type="edm",
        scheduler=dict(EDM_SCHEDULER),
        in_channels=config.in_channels,
        sample_size=config.img_resolution,
        num_classes=config.label_dim or None,
        null_class=None,
        source=source,
    )
