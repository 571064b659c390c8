"""The kernel launches the shipped models make, recorded from forward passes on the meta device.

``fastdiff.kernels.aot`` compiles hand-picked shapes of each kernel; this module adds what the models really
launch. Each model is built on the meta device (no memory, no arithmetic), every fused op is put on a Triton
path, and one forward pass runs with each kernel module's ``_launches`` helper wrapped: the wrapper records
the launch the helper computes for a CUDA device (kernel, positional args, constexprs and options: everything
a compile depends on) and returns no launch, so nothing runs. The configurations then carry the models' own
channels per group, scale / shift norms, head dims, projection-view strides and batch sizes.

Two passes per model, dtype, layout and network batch cover every Triton path a layer can take:
``"triton"`` everywhere (the one-pass residual + adaLN, the pointer attention) and the alternatives
(GroupNorm's ``rows`` strategy, the adaLN kernel pair, the TMA attention). The batches are every network batch
of the default buckets (GroupNorm's split count, and so its compile, depends on the batch).

Not covered: the weight fusions (``fuse_qkv`` / ``fuse_conditioning`` / ``fuse_adaln``; their stacked views
change strides, but recording the models with every fusion adds no compile key), and resolutions other than
each model's own (a user's choice: SD1.5 at 768 px adds about 50 GroupNorm keys, which the JIT compiles on first
use like any other).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Callable

import torch

def model_batches() -> tuple:
    """The network batches of ``OptimizeConfig``'s default buckets: each bucket and its CFG double."""
    from ..runtime.config import OptimizeConfig
    from ..runtime.graphs import network_buckets

    return network_buckets(OptimizeConfig().batch_buckets)


PASSES = {  # OptimizeConfig.kernel_ops-style: op -> the implementation each pass puts it on
    "triton": {},
    "alt": {"group_norm": "triton_rows", "adaln_modulate": "triton_pair", "attention": "triton_tma"},
}
# (module, launches helper, the kernel it launches or None when the helper names it, the op it serves)
_HELPERS = (
    ("group_norm", "_launches", None, "group_norm"),
    ("attention", "_launches", "_attention_kernel", "attention"),
    ("attention_tma", "_launches", "_attention_tma_kernel", "attention_tma"),
    ("adaln", "_adaln_launches", "_adaln_modulate_kernel", None),  # op from its residual argument
    ("adaln", "_gated_residual_launches", "_gated_residual_kernel", "gated_residual"),
    ("geglu", "_launches", "_geglu_kernel", "geglu"),
)


def _adm_256_config():
    """guided-diffusion's ImageNet 256x256 ADM (what ``guided_diffusion_config`` reads from its checkpoint)."""
    from ..models.unet import UNetConfig

    channels, attn = [256, 256, 512, 512, 1024, 1024], [False, False, False, True, True, True]
    return UNetConfig.from_diffusers(dict(
        sample_size=256, in_channels=3, out_channels=6, block_out_channels=channels, layers_per_block=2,
        down_block_types=["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)],
        downsample_type="resnet", upsample_type="resnet", norm_num_groups=32, attn_norm_num_groups=32,
        attention_head_dim=64, resnet_time_scale_shift="scale_shift", num_class_embeds=1000,
        time_embedding_dim=1024, flip_sin_to_cos=True, freq_shift=0), "UNet2DModel")


def _edm_config(**kw):
    from ..models.edm import EDMUNetConfig

    return EDMUNetConfig(**kw)


def _builders() -> dict[str, Callable]:
    """Model name -> builder of (model on the meta device, its inputs' sizes): the arch: presets plus the EDM and
    ADM configurations fastdiff loads from checkpoints (their scale-shift GroupNorms and channel counts)."""
    from ..checkpoints.presets import ARCH_NAMES, build_arch
    from ..models import build_model

    def arch(name):
        def build():
            model, spec = build_arch(name, device="meta")
            return model, _spec_info(spec)
        return build

    def native(kind, make_config, size, in_channels, classes=None):
        return lambda: (build_model(kind, make_config(), device="meta"),
                        dict(size=size, in_channels=in_channels, classes=classes, text=None))

    out = {name: arch(name) for name in ARCH_NAMES}
    out["adm-256"] = native("unet", _adm_256_config, 256, 3, classes=1000)
    # EDM's CIFAR-10 DDPM++ (SongUNet) and its ImageNet-64 ADM (DhariwalUNet), as in its paper's configs
    out["edm-cifar10"] = native("edm", lambda: _edm_config(), 32, 3)
    out["edm-imagenet64"] = native("edm", lambda: _edm_config(
        model_type="DhariwalUNet", img_resolution=64, label_dim=1000, model_channels=192, channel_mult=(1, 2, 3, 4),
        num_blocks=3, attn_resolutions=(32, 16, 8)), 64, 3, classes=1000)
    return out


MODELS = ("sd15-unet", "sd21-unet", "sdxl-unet", "sd3-medium", "flux-dev", "ddpm-cifar10", "dit-xl-2-256", "dit-xl-2-512", "tiny-unet", "tiny-sd-unet",
          "tiny-dit", "adm-256", "edm-cifar10", "edm-imagenet64")


def _inputs(info, batch: int, dtype, channels_last: bool) -> tuple[tuple, dict]:
    """(args, kwargs) of one network call at ``batch`` on the meta device."""
    h = w = info["size"]
    x = torch.empty(batch, info["in_channels"], h, w, device="meta", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kw = {}
    if info["classes"]:
        kw["class_labels"] = torch.zeros(batch, dtype=torch.long, device="meta")
    if info["text"]:
        kw["encoder_hidden_states"] = torch.empty(batch, info.get("tokens", 77), info["text"], device="meta",
                                                  dtype=dtype)
    if info.get("text_embeds"):  # SDXL's / SD3's pooled text embedding (and SDXL's size / crop ids)
        kw["text_embeds"] = torch.empty(batch, info["text_embeds"], device="meta", dtype=dtype)
    if info.get("time_ids"):
        kw["time_ids"] = torch.empty(batch, info["time_ids"], device="meta", dtype=dtype)
    if info.get("guidance"):  # Flux dev's distilled-guidance strength
        kw["guidance"] = torch.empty(batch, device="meta")
    return (x, torch.empty(batch, device="meta")), kw


def _spec_info(spec) -> dict:
    size = spec.sample_size[0] if isinstance(spec.sample_size, (tuple, list)) else spec.sample_size
    return dict(size=size, in_channels=spec.in_channels, classes=spec.num_classes, text=spec.cross_attention_dim,
                text_embeds=spec.text_embeds_dim, time_ids=spec.time_ids_dim, tokens=spec.text_tokens,
                guidance=spec.guidance_input)


def _op_of(helper_op, bound) -> str:
    if helper_op is not None:
        return helper_op
    residual = bound.arguments.get("residual")  # _adaln_launches
    if residual is None:
        return "adaln_modulate"
    return "residual_layer_norm" if residual[0] is None else "gated_residual_modulate"


@contextlib.contextmanager
def recording(launches: list, passthrough: bool = False):
    """Within: every kernel module's launch helper appends ``(op, kernel, args, meta)`` for a CUDA device to
    ``launches`` and returns no launch (the caller then launches nothing). ``passthrough``: record the launches
    for the tensors' own device and make them (a check that recording sees what a real run launches)."""
    patched = []
    try:
        for module_name, helper, kernel_name, op in _HELPERS:
            module = importlib.import_module(f"fastdiff.kernels.{module_name}")
            original = getattr(module, helper)
            signature = inspect.signature(original)

            def record(*args, _original=original, _signature=signature, _module=module, _kernel=kernel_name,
                       _op=op, **kwargs):
                bound = _signature.bind(*args, **kwargs)
                if "device_type" in bound.arguments and not passthrough:
                    bound.arguments["device_type"] = "cuda"  # what a GPU launch would compute
                made = list(_original(*bound.args, **bound.kwargs))
                for launch in made:
                    kernel, (grid, largs, meta) = ((getattr(_module, _kernel), launch) if _kernel
                                                   else (launch[0], launch[1:]))
                    launches.append((_op_of(_op, bound), kernel, largs, meta))
                return made if passthrough else []

            setattr(module, helper, record)
            patched.append((module, helper, original))
        yield launches
    finally:
        for module, helper, original in patched:
            setattr(module, helper, original)


def _put_on_triton(model, ops: dict) -> None:
    """Every fused op of ``model`` on its Triton path (``ops`` overrides per op), as ``set_backend`` does on a GPU
    (set directly: ``set_backend`` checks for a GPU or the interpreter, and the meta device has neither)."""
    from ..models.layers import FusedOp

    for m in model.modules():
        if isinstance(m, FusedOp):
            m.set_backend(ops.get(m.op, "triton"))


def record_model(name: str, dtype=torch.float16, channels_last: bool = False, batch: int = 2,
                 ops: dict = None) -> list[tuple]:
    """[(op, kernel, args, meta)] of one forward pass of model ``name`` (a key of ``MODELS``)."""
    model, info = _builders()[name]()
    model = model.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    _put_on_triton(model, ops or {})
    args, kwargs = _inputs(info, batch, dtype, channels_last)
    launches = []
    with recording(launches), torch.no_grad():
        model(*args, **kwargs)
    return launches


def compile_key(kernel, args, meta, dtype) -> tuple:
    """What makes two launches one compile: the kernel, the argument types and the JIT's integer
    specialisations (== 1 -> constexpr, % 16 -> a divisibility hint), the constexprs and options."""
    def arg_key(a):
        if isinstance(a, torch.Tensor):
            return ("*", a.dtype)
        if isinstance(a, bool):
            return ("i1", a)
        if isinstance(a, int):
            return ("i", a == 1, a % 16 == 0, -2**31 <= a < 2**31)
        if isinstance(a, float):
            return ("f",)
        if type(a).__name__ == "TensorDescriptor":
            return ("desc", a.base.dtype, tuple(a.block_shape))
        return (type(a).__name__,)
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
    return name, dtype, tuple(arg_key(a) for a in args), tuple(sorted(meta.items()))


def model_launches(models=MODELS, dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> list[tuple]:
    """[(label, op, kernel, args, meta, dtype)], one per distinct compile, over every model, dtype, layout, batch
    and pass. Labels say where each first appeared."""
    seen, out = set(), []
    for name in models:
        for dtype in dtypes:
            for layout in ("nchw", "cl"):
                if layout == "cl" and name.startswith(("dit", "tiny-dit")):  # DiT: no 4-D activations
                    continue
                for batch in model_batches():
                    for pass_name, ops in PASSES.items():
                        for op, kernel, args, meta in record_model(name, dtype, layout == "cl", batch, ops):
                            main = _data_tensor(args)  # the launch's own dtype: SD2.1 upcasts its attention
                            key = compile_key(kernel, args, meta, main.dtype)
                            if key in seen:
                                continue
                            seen.add(key)
                            label = f"model {name} {layout} b{batch} {pass_name}: {'x'.join(map(str, main.shape))}"
                            out.append((label, op, kernel, args, meta, main.dtype))
    return out


def _data_tensor(args) -> torch.Tensor:
    """The tensor argument that says the launch's dtype: the first half-precision one (a float32 statistics
    workspace may come first), else the first (a TMA descriptor's tensor for the descriptor kernel)."""
    tensors = [a.base if type(a).__name__ == "TensorDescriptor" else a for a in args
               if isinstance(a, torch.Tensor) or type(a).__name__ == "TensorDescriptor"]
    return next((t for t in tensors if t.dtype in (torch.float16, torch.bfloat16)), tensors[0])
