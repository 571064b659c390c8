"""DiT checkpoints -> fastdiff's native DiT (``fastdiff.models.dit``).

Two foreign formats:

* **official facebookresearch/DiT** ``.pt``: a plain state dict, or a train.py checkpoint
  ``{"model", "ema", "opt", "args"}`` (the ``ema`` weights are the ones to sample with). The key layout
  IS the native one; only the config has to be inferred from the tensor shapes.
* **diffusers** ``DiTTransformer2DModel`` (and the older ``Transformer2DModel`` with ``patch_size`` and
  ``norm_type="ada_norm_zero"``): ``dit_config_from_diffusers`` maps the config, ``convert_diffusers_dit``
  renames / fuses the weights (q, k, v -> one qkv) and adds the sin-cos ``pos_embed`` diffusers keeps
  as a non-persistent buffer.

Loading: ``build_dit(config, state_dict)`` builds on the meta device and assigns the tensors after
``load_into`` has checked every key and shape.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from ..errors import CheckpointError, StateDictMismatchError, UnknownFormatError, UnsupportedConfigError
from ..models.dit import DIT_PRESETS, DiT, DiTConfig, OFFICIAL_HEADS_BY_HIDDEN, sincos_pos_embed_2d
from .io import pick_state_dict, read_safetensors, read_torch_file
from .common import RequiredKeys

# Keys every official DiT state dict holds (any size).
_OFFICIAL_MARKERS = ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight",
                     "y_embedder.embedding_table.weight", "blocks.0.adaLN_modulation.1.weight",
                     "blocks.0.attn.qkv.weight", "final_layer.linear.weight")


# ---------------------------------------------------------------------------------------------------
# Official facebookresearch/DiT
# ---------------------------------------------------------------------------------------------------

def is_official_dit_state_dict(sd) -> bool:
    """True when ``sd`` has the official DiT key layout (also fastdiff's native layout)."""
    return isinstance(sd, dict) and all(k in sd for k in _OFFICIAL_MARKERS)


def official_dit_config_from_state_dict(sd: dict, num_heads: Optional[int] = None,
                                        class_dropout_prob: float = 0.1) -> DiTConfig:
    """Infer the DiTConfig from an official state dict's shapes.

    The head count is not in the weights: ``num_heads`` if given, else the official preset's for that
    hidden size (384: 6, 768: 12, 1024 / 1152: 16), else hidden // 64 (1 when that does not divide).
    ``class_dropout_prob`` > 0 (official training uses 0.1) means the label table's last row is the
    null class, so num_classes = rows - 1.
    """
    if not is_official_dit_state_dict(sd):
        missing = [k for k in _OFFICIAL_MARKERS if k not in (sd if isinstance(sd, dict) else {})]
        raise UnknownFormatError(f"not an official DiT state dict: expected keys {list(_OFFICIAL_MARKERS)}, "
                                 f"missing {missing}")
    sd = RequiredKeys(sd, "an official DiT checkpoint")  # a tensor read below and missing is named
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    num_patches = int(sd["pos_embed"].shape[1])
    grid = int(round(num_patches ** 0.5))
    if grid * grid != num_patches:
        raise UnsupportedConfigError("pos_embed", tuple(sd["pos_embed"].shape),
                                     supported="a square token grid (1, g*g, D)", model="DiT")
    out_features = int(sd["final_layer.linear.weight"].shape[0])
    out_channels = out_features // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels) or out_channels * patch * patch != out_features:
        raise UnsupportedConfigError("out_channels", out_channels,
                                     supported=f"{in_channels} or {2 * in_channels} (= in_channels, or twice "
                                               f"with learn_sigma)", model="DiT")
    rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
    if num_heads is None:
        num_heads = OFFICIAL_HEADS_BY_HIDDEN.get(hidden)
        if num_heads is None:
            num_heads = hidden // 64 if hidden >= 64 and hidden % 64 == 0 else 1
    return DiTConfig(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=int(sd["blocks.0.mlp.fc1.weight"].shape[0]) / hidden,
        class_dropout_prob=class_dropout_prob,
        num_classes=rows - 1 if class_dropout_prob > 0 else rows,
        learn_sigma=out_channels == 2 * in_channels,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        frequency_embedding_size=int(sd["t_embedder.mlp.0.weight"].shape[1]),
    )


def load_official_dit(path: str, num_heads: Optional[int] = None) -> tuple[DiTConfig, dict, list]:
    """Read an official DiT checkpoint (plain state dict, or train.py's dict, whose ``ema`` is used): (config, state
    dict, notes). A head count that neither ``num_heads``, train.py's ``args.model`` nor a preset's width gives is
    guessed (64 channels per head, as the presets have), and the notes say so."""
    if path.endswith(".safetensors"):
        obj = read_safetensors(path)
    else:
        obj = read_torch_file(path)
    notes = []
    sd = pick_state_dict(obj, prefer=("ema", "model"), source=path, notes=notes)
    if not is_official_dit_state_dict(sd):
        raise UnknownFormatError(f"{path} is not an official DiT checkpoint: expected keys "
                                 f"{list(_OFFICIAL_MARKERS)}, found {sorted(sd)[:8]}...")
    if num_heads is None:
        num_heads = _heads_from_train_args(obj)
    cfg = official_dit_config_from_state_dict(sd, num_heads=num_heads)
    if num_heads is None and cfg.hidden_size not in OFFICIAL_HEADS_BY_HIDDEN:
        notes.append(f"num_heads guessed as {cfg.num_heads} (width {cfg.hidden_size} is no official preset's and the "
                     f"weights do not store it): pass num_heads= if the model was trained with another")
    return cfg, sd, notes


def _heads_from_train_args(obj) -> Optional[int]:
    """train.py checkpoints keep ``args.model`` (e.g. "DiT-XL/2"): the preset names the head count."""
    args = obj.get("args") if isinstance(obj, dict) else None
    name = getattr(args, "model", None)
    if isinstance(name, str) and name in DIT_PRESETS:
        return DiTConfig.from_name(name).num_heads
    return None


# ---------------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel / Transformer2DModel(patch_size, ada_norm_zero)
# ---------------------------------------------------------------------------------------------------

DIFFUSERS_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")

# Config fields that matter only in training or not at all for this architecture: accepted, not used.
#   dropout: inference runs in eval mode; norm_num_groups: no GroupNorm in the patched path;
#   upcast_attention: float32 softmax either way on fastdiff's paths; use_linear_projection: continuous
#   (non-patched) inputs only; use_additional_conditions: ada_norm_single (PixArt) only.
_IGNORED = ("dropout", "norm_num_groups", "upcast_attention", "use_linear_projection", "use_additional_conditions")
# Fields that must hold exactly these values (anything else is another architecture).
_REQUIRED_VALUES = {
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "cross_attention_dim": None,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "double_self_attention": False,
    "attention_type": "default",
    "caption_channels": None,
}
_ACTIVATIONS = {"gelu-approximate": "gelu_tanh", "gelu": "gelu"}
_USED = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
         "attention_bias", "sample_size", "patch_size", "activation_fn", "num_embeds_ada_norm", "norm_eps",
         "interpolation_scale")


def is_diffusers_dit_config(config: dict) -> bool:
    """A diffusers transformer config this module converts (by class name, or DiT's fields)."""
    name = config.get("_class_name")
    if name == "DiTTransformer2DModel":
        return True
    return name in (None, "Transformer2DModel") and config.get("patch_size") is not None \
        and config.get("norm_type") == "ada_norm_zero"


def dit_config_from_diffusers(config: dict, state_dict: Optional[dict] = None) -> DiTConfig:
    """Map a diffusers DiT config to DiTConfig; a value the native model does not implement raises
    UnsupportedConfigError naming the field and value.

    ``per_block_conditioning``: diffusers gives every block its own timestep / class embedder. Given the
    ``state_dict``, it is True only when those copies differ (a random-initialised model); without it,
    True (exact for any weights, at the cost of depth - 1 extra small embedders).
    """
    cls = config.get("_class_name", "DiTTransformer2DModel")
    if cls not in DIFFUSERS_DIT_CLASSES:
        raise UnsupportedConfigError("_class_name", cls, supported=list(DIFFUSERS_DIT_CLASSES), model="DiT")
    legacy = cls == "Transformer2DModel"
    # diffusers' own defaults for the fields a config may leave out
    defaults = dict(num_attention_heads=16, attention_head_dim=72 if not legacy else 88, in_channels=4,
                    out_channels=None, num_layers=28 if not legacy else 1, attention_bias=True if not legacy
                    else False, sample_size=32, patch_size=2, activation_fn="gelu-approximate" if not legacy
                    else "geglu", num_embeds_ada_norm=1000, norm_eps=1e-5, interpolation_scale=None,
                    norm_type="ada_norm_zero" if not legacy else "layer_norm",
                    norm_elementwise_affine=False if not legacy else True)
    cfg = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}

    for k, v in cfg.items():
        if k not in _USED and k not in _IGNORED and k not in _REQUIRED_VALUES:
            raise UnsupportedConfigError(k, v, supported="a DiTTransformer2DModel config field", model="DiT")
    for k, want in _REQUIRED_VALUES.items():
        if k in cfg and cfg[k] != want:
            raise UnsupportedConfigError(k, cfg[k], supported=[want], model="DiT")
    act = cfg["activation_fn"]
    if act not in _ACTIVATIONS:
        raise UnsupportedConfigError("activation_fn", act, supported=list(_ACTIVATIONS), model="DiT")
    for k in ("in_channels", "patch_size", "sample_size", "num_embeds_ada_norm", "num_layers", "num_attention_heads",
              "attention_head_dim", "out_channels"):
        v = cfg[k]
        if (v is not None or k != "out_channels") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UnsupportedConfigError(k, v, supported="a positive int", model="DiT")
    if not isinstance(cfg["attention_bias"], bool):  # (bool("false") is True)
        raise UnsupportedConfigError("attention_bias", cfg["attention_bias"], supported="true or false", model="DiT")
    if isinstance(cfg["norm_eps"], bool) or not isinstance(cfg["norm_eps"], (int, float)) or not cfg["norm_eps"] > 0:
        raise UnsupportedConfigError("norm_eps", cfg["norm_eps"], supported="a positive number", model="DiT")
    in_ch, sample, patch = cfg["in_channels"], cfg["sample_size"], cfg["patch_size"]
    if sample % patch:
        raise UnsupportedConfigError("sample_size", sample, supported=f"a multiple of patch_size={patch}",
                                     model="DiT")
    out_ch = in_ch if cfg["out_channels"] is None else cfg["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise UnsupportedConfigError("out_channels", out_ch,
                                     supported=f"{in_ch} or {2 * in_ch} (in_channels, or twice for learned "
                                               f"sigma)", model="DiT")
    # diffusers' from_pretrained builds every ada_norm_zero folder, Transformer2DModel ones too, as
    # DiTTransformer2DModel, whose position table has no interpolation scale (1, as the official DiT): a config's
    # interpolation_scale, and the legacy class's max(sample_size // 64, 1), never reach the numbers
    interp = 1
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    per_block = True if state_dict is None else not _embedders_identical(state_dict, cfg["num_layers"])
    return DiTConfig(
        input_size=sample,
        patch_size=patch,
        in_channels=in_ch,
        hidden_size=heads * head_dim,
        depth=cfg["num_layers"],
        num_heads=heads,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,  # diffusers' LabelEmbedding: always a null row
        num_classes=cfg["num_embeds_ada_norm"],
        learn_sigma=out_ch == 2 * in_ch,
        qkv_bias=bool(cfg["attention_bias"]),
        mlp_act=_ACTIVATIONS[act],
        norm_eps=1e-6,  # AdaLayerNormZero and norm_out hard-code 1e-6
        mlp_norm_eps=float(cfg["norm_eps"]),  # norm3
        frequency_embedding_size=256,
        freq_shift=1.0,  # Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
        pos_interpolation_scale=float(interp),
        per_block_conditioning=per_block,
    )


_EMB = "transformer_blocks.{i}.norm1.emb."
_EMB_KEYS = {  # diffusers CombinedTimestepLabelEmbeddings -> native embedder names
    "timestep_embedder.linear_1": "t_embedder.mlp.0",
    "timestep_embedder.linear_2": "t_embedder.mlp.2",
    "class_embedder.embedding_table": "y_embedder.embedding_table",
}


def _embedders_identical(sd: dict, depth: int) -> bool:
    prefix0 = _EMB.format(i=0)
    keys0 = [k[len(prefix0):] for k in sd if k.startswith(prefix0)]
    for i in range(1, depth):
        p = _EMB.format(i=i)
        for k in keys0:
            a, b = sd.get(prefix0 + k), sd.get(p + k)
            if b is None or a.shape != b.shape or not torch.equal(a, b):
                return False
    return True


def convert_diffusers_dit(state_dict: dict, config: DiTConfig) -> dict:
    """diffusers DiT state dict -> native (official-layout) state dict for ``config``.

    q / k / v are concatenated into ``qkv`` (head-major, as timm's layout); the final layer's
    ``proj_out_1`` emits (shift, scale) and the blocks' ``norm1.linear`` the six official chunks in the
    official order, so those copy as they are. ``pos_embed`` (not in diffusers' state dict) is computed.
    Keys the conversion does not consume are passed through under their diffusers names, so the strict
    load reports them as unexpected rather than dropping them silently.
    """
    src = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def take(key_from: str, key_to: str):
        if key_from in src:
            out[key_to] = src.pop(key_from)

    take("pos_embed.proj.weight", "x_embedder.proj.weight")
    take("pos_embed.proj.bias", "x_embedder.proj.bias")
    for i in range(config.depth):
        b, n = f"transformer_blocks.{i}.", f"blocks.{i}."
        emb = _EMB.format(i=i)
        for d_key, n_key in _EMB_KEYS.items():
            for suffix in (".weight", ".bias"):
                k = emb + d_key + suffix
                if k not in src:
                    continue
                if i == 0:
                    out[n_key + suffix] = src.pop(k)
                elif config.per_block_conditioning:
                    out[n + n_key + suffix] = src.pop(k)
                else:
                    t = src.pop(k)
                    ref = out.get(n_key + suffix)
                    if ref is None or ref.shape != t.shape or not torch.equal(ref, t):
                        raise CheckpointError(
                            f"diffusers DiT: block {i}'s timestep / class embedder ({k}) differs from block 0's, "
                            f"so it cannot share one embedder; expected identical copies (as in converted "
                            f"checkpoints), found different values. Use a config with "
                            f"per_block_conditioning=True (dit_config_from_diffusers(config, state_dict) "
                            f"decides this for you).")
        take(b + "norm1.linear.weight", n + "adaLN_modulation.1.weight")
        take(b + "norm1.linear.bias", n + "adaLN_modulation.1.bias")
        for suffix in (".weight", ".bias"):
            qkv = [b + f"attn1.to_{x}{suffix}" for x in "qkv"]
            if all(k in src for k in qkv):
                out[n + "attn.qkv" + suffix] = torch.cat([src.pop(k) for k in qkv], dim=0)
        take(b + "attn1.to_out.0.weight", n + "attn.proj.weight")
        take(b + "attn1.to_out.0.bias", n + "attn.proj.bias")
        take(b + "ff.net.0.proj.weight", n + "mlp.fc1.weight")
        take(b + "ff.net.0.proj.bias", n + "mlp.fc1.bias")
        take(b + "ff.net.2.weight", n + "mlp.fc2.weight")
        take(b + "ff.net.2.bias", n + "mlp.fc2.bias")
    take("proj_out_1.weight", "final_layer.adaLN_modulation.1.weight")
    take("proj_out_1.bias", "final_layer.adaLN_modulation.1.bias")
    take("proj_out_2.weight", "final_layer.linear.weight")
    take("proj_out_2.bias", "final_layer.linear.bias")
    src.pop("pos_embed.pos_embed", None)  # only persistent with pos_embed_max_size (SD3); recomputed anyway
    dtype = out["x_embedder.proj.weight"].dtype if "x_embedder.proj.weight" in out else torch.float32
    out["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, config.grid_size,
                                           config.pos_interpolation_scale).unsqueeze(0).to(dtype)
    out.update(src)  # leftovers: reported as unexpected by load_into
    return out


def load_diffusers_dit(config: dict, state_dict: dict) -> tuple[DiTConfig, dict]:
    """(DiTConfig, native state dict) from a diffusers DiT config dict and its state dict."""
    cfg = dit_config_from_diffusers(config, state_dict)
    return cfg, convert_diffusers_dit(state_dict, cfg)


# ---------------------------------------------------------------------------------------------------
# Strict loading (meta build + assign)
# ---------------------------------------------------------------------------------------------------

def load_into(model: torch.nn.Module, sd: dict, *, assign: Optional[bool] = None, model_name: str = "DiT") -> None:
    """Load ``sd`` into ``model`` after checking every key and shape (StateDictMismatchError otherwise).

    ``assign`` defaults to True when the model still has meta tensors (built on the meta device). A
    missing ``pos_embed`` is not an error: it is derived data, recomputed from the config.
    """
    expected = model.state_dict()
    sd = dict(sd)
    recompute_pos = "pos_embed" in expected and "pos_embed" not in sd
    missing = [k for k in expected if k not in sd and not (k == "pos_embed" and recompute_pos)]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [(k, tuple(expected[k].shape), tuple(sd[k].shape)) for k in expected
                  if k in sd and tuple(expected[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing=missing, unexpected=unexpected, mismatched=mismatched,
                                     model=model_name)
    if assign is None:
        assign = any(t.is_meta for t in expected.values())
    if recompute_pos:
        ref = next(iter(sd.values()))
        sd["pos_embed"] = torch.empty(expected["pos_embed"].shape, dtype=ref.dtype, device=ref.device)
    model.load_state_dict(sd, strict=True, assign=assign)
    if recompute_pos:
        model.init_pos_embed()


def build_dit(config: DiTConfig, state_dict: dict, *, device=None, dtype: Optional[torch.dtype] = None) -> DiT:
    """Build on the meta device and assign ``state_dict`` (moved to device / dtype first): no random
    init, no second copy of the weights."""
    with torch.device("meta"):
        model = DiT(config)
    sd = state_dict
    if device is not None or dtype is not None:
        sd = {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
              for k, v in sd.items()}
    load_into(model, sd, assign=True)
    return model.eval()


def load_dit(path: str, *, num_heads: Optional[int] = None, device=None,
             dtype: Optional[torch.dtype] = None) -> DiT:
    """An official DiT checkpoint file -> native DiT in eval mode."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    config, sd, _ = load_official_dit(path, num_heads=num_heads)
    return build_dit(config, sd, device=device, dtype=dtype)


__all__ = ["is_official_dit_state_dict", "official_dit_config_from_state_dict", "load_official_dit",
           "is_diffusers_dit_config", "dit_config_from_diffusers", "convert_diffusers_dit", "load_diffusers_dit",
           "load_into", "build_dit", "load_dit"]
