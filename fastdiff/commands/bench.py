"""``fastdiff bench``: end-to-end sampling latency per backend and batch size, optionally against diffusers.

    fastdiff bench arch:sd15-unet --backends eager,compile --batch 1,4 --steps 20 --cfg 7.5 --dtype fp16 \
        --compare diffusers,compile --json sd15.json --plot sd15.png

What is measured: one ``pipe.generate`` call (noise, the whole sampling loop, CFG included; no decoding)
with its result on the host's side of a device synchronisation. Per backend and batch: the first call
timed on its own (compilation / graph capture / kernel JIT show up as ``warm-up overhead`` = first call
minus a steady call), ``--warmup - 1`` more untimed calls, then ``--repeat`` timed calls (CUDA events on
a GPU, perf_counter on the CPU): median / p90 / p99, per step (median / steps), per network evaluation
(median / NFE), images/s (batch / median) and peak memory (see ``fastdiff.runtime.timing``).

``--compare diffusers`` rebuilds the SAME weights as a diffusers model (UNet2DModel /
UNet2DConditionModel / DiTTransformer2DModel) and times it in a diffusers-pipeline style loop with the
matching diffusers scheduler, in the same process; ``--compare diffusers,compile`` also times
``torch.compile`` of that diffusers model. The ratio column is fastdiff / diffusers (below 1: fastdiff
is faster).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import traceback

from .generate import add_load_arguments, load_options

COMPARE_CHOICES = ("diffusers", "compile")


def register(sub) -> None:
    from ..runtime.config import BACKENDS, DTYPES
    from ..sampling import SAMPLERS, SCHEDULES

    p = sub.add_parser(
        "bench", help="measure sampling latency per backend and batch (optionally against diffusers)",
        description="Time end-to-end sampling (pipe.generate: the sampling loop with CFG, no decoding) of MODEL "
                    "for each backend and batch size: warm-up, device-synchronised timing (CUDA events on a "
                    "GPU), median / p90 / p99 latency, per-step latency, images/s, peak memory and "
                    "compile / capture time. Backends that cannot run here are listed as skipped with the "
                    "reason. arch:NAME builds a well-known architecture with random weights (no download).")
    p.add_argument("model", metavar="MODEL", nargs="?", default="builtin:digits",
                   help="checkpoint path, builtin:NAME, or arch:NAME (random weights: sd15-unet, sd21-unet, "
                        "ddpm-cifar10, dit-xl-2-256, dit-xl-2-512, tiny-unet, tiny-sd-unet, tiny-dit); "
                        "default builtin:digits")
    p.add_argument("--backends", default="eager", metavar="LIST",
                   help=f"comma-separated backends from {', '.join(BACKENDS)} (default eager), each optionally "
                        f"with switches joined by '+': step / loop (CUDA graphs of one network call / of the "
                        f"whole sampling loop), cl (channels_last), qkv (fused q/k/v), allk (every fused op on Triton), "
                        f"tune (each fused layer times its kernels on its first call and keeps the fastest), "
                        f"gnext (GroupNorm from the CUDA extension), gnrows (GroupNorm's rows strategy), geglu (SD's GEGLU on "
                        f"Triton), upd / updext (the samplers' fused state update on Triton / "
                        f"the CUDA extension), flash / efficient (SDPA pinned to that backend), "
                        f"e.g. triton+loop+qkv")
    p.add_argument("--batch", default="1", metavar="LIST", help="comma-separated batch sizes (default 1)")
    p.add_argument("--steps", type=int, default=20, metavar="N", help="sampling steps per call (default 20)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpmpp_2m", help="sampler (default dpmpp_2m)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                   help="sigma grid (default: the checkpoint's timestep spacing; karras for EDM models)")
    p.add_argument("--cfg", type=float, default=1.0, metavar="G",
                   help="classifier-free guidance scale; != 1 doubles the network batch (default 1)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="network precision for every backend and the diffusers comparison (default: the "
                        "checkpoint's)")
    p.add_argument("--device", default=None, metavar="DEV", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--warmup", type=int, default=2, metavar="N",
                   help="untimed-for-statistics calls before timing, the first included (default 2; the first "
                        "call is reported on its own as the compile / capture overhead)")
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="timed calls per backend and batch (default 5)")
    p.add_argument("--compare", default=None, metavar="LIST",
                   help="'diffusers': time the same weights in diffusers (eager) in this run; 'diffusers,compile' "
                        "also torch.compile of the diffusers model (max-autotune on a GPU)")
    p.add_argument("--compile-mode", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the diffusers comparison (default: max-autotune on a GPU, default on "
                        "the CPU)")
    p.add_argument("--controlnet", default=None, metavar="FOLDER|random",
                   help="time text-to-image driven by a ControlNet: a diffusers ControlNetModel folder, or 'random' "
                        "(ControlNet.from_unet of the model, seeded random outputs); the diffusers comparison runs "
                        "the same ControlNet")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the noise and random text states")
    p.add_argument("--quality", action="store_true",
                   help="instead of latency: digits-FD and class accuracy vs NFE for every sampler on a digits "
                        "model (builtin:digits), guided at --cfg (default 3 here); --plot draws the curves")
    p.add_argument("--nfe", default="4,6,8,10,15,20,50,100", metavar="LIST",
                   help="--quality: NFE budgets (default 4,6,8,10,15,20,50,100)")
    p.add_argument("--samplers", default=None, metavar="LIST", help="--quality: samplers (default: all)")
    p.add_argument("--per-class", type=int, default=20, metavar="N",
                   help="--quality: samples per digit class per cell (default 20)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch and ONNX Runtime (default: torch's default); 1 gives steadier "
                        "figures on a shared machine")
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="write every figure with the device, versions and settings as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw median latency vs batch per backend")
    add_load_arguments(p)
    # each mode's own options keep their defaults here, so the other mode can refuse them when given
    p.set_defaults(func=run, mode_defaults={dest: p.get_default(dest) for dest in LATENCY_ONLY + QUALITY_ONLY})


# options that only one mode reads: given to the other, they are refused (never silently ignored)
LATENCY_ONLY = ("backends", "batch", "steps", "sampler", "schedule", "dtype", "warmup", "repeat", "compare",
                "compile_mode", "controlnet")
QUALITY_ONLY = ("nfe", "samplers", "per_class")


def _refuse_other_mode(args) -> None:
    from ..errors import BadArgumentError

    defaults = getattr(args, "mode_defaults", {})
    others = QUALITY_ONLY if not args.quality else LATENCY_ONLY
    given = ["--" + d.replace("_", "-") for d in others if d in defaults and getattr(args, d) != defaults[d]]
    if given:
        mode, other = ("latency", "--quality") if not args.quality else ("--quality", "latency")
        raise BadArgumentError(f"{', '.join(given)}: {'options' if len(given) > 1 else 'an option'} of the {other} "
                               f"mode, found in a {mode} run")
    if not args.quality and args.compile_mode is not None and "compile" not in (args.compare or ""):
        raise BadArgumentError("--compile-mode: the mode of the diffusers torch.compile comparison, found without "
                               "--compare diffusers,compile (fastdiff's own compile backend takes +autotune)")


def _check_output(flag: str, path, extensions) -> None:
    """A --json / --plot target, checked before any run: a finished run must never fail on its output."""
    from ..errors import BadArgumentError
    from ..utils.atomic import check_file_path

    if not path:
        return
    try:
        check_file_path(path)
    except BadArgumentError as e:
        raise BadArgumentError(f"{flag}: {e}") from None
    if extensions and not path.lower().endswith(tuple(extensions)):
        raise BadArgumentError(f"{flag}: expected a file name ending in one of {sorted(extensions)}, found {path!r}")


def _plot_extensions() -> tuple:
    """The image formats matplotlib writes; --plot needs matplotlib (BadArgumentError, one line, when missing)."""
    from ..errors import BadArgumentError

    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError as e:
        raise BadArgumentError("--plot needs matplotlib (pip install matplotlib)") from e
    return tuple("." + ext for ext in Figure().canvas.get_supported_filetypes())


def _save_figure(fig, path: str) -> None:
    """The figure written atomically, in the format its extension names."""
    import os

    from ..utils.atomic import atomic_path

    with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
        fig.savefig(tmp, dpi=120)


def _write_json(path: str, obj) -> None:
    import json

    from ..utils.atomic import atomic_path

    with atomic_path(path, suffix=".json") as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)


# ---------------------------------------------------------------------------------------------------
# argument parsing helpers
# ---------------------------------------------------------------------------------------------------

def _parse_list(text: str, name: str, allowed=None) -> list:
    from ..errors import BadArgumentError

    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise BadArgumentError(f"{name}: expected a comma-separated list, found {text!r}")
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise BadArgumentError(f"{name}: expected names from {list(allowed)}, found {bad[0]!r}")
    return list(dict.fromkeys(items))


# '+'-joined switches a --backends entry may carry, and the OptimizeConfig fields they set
VARIANT_SWITCHES = {
    "step": dict(cuda_graphs=True, graph_scope="step"),
    "loop": dict(cuda_graphs=True, graph_scope="loop"),
    "cl": dict(channels_last=True),
    "qkv": dict(fuse_qkv=True),  # one matmul for self-attention's q, k, v (default on CUDA)
    "noqkv": dict(fuse_qkv=False),  # ... three (the default off CUDA)
    "adaln": dict(fuse_adaln=True),  # DiT: every adaLN modulation in one matmul per call (default on CUDA)
    "noadaln": dict(fuse_adaln=False),  # DiT: one matmul per adaLN projection (the default off CUDA)
    # DiT in a captured loop: every step's adaLN modulation from one matmul at the loop's start (default on CUDA)
    "precompute": dict(precompute_adaln=True),
    "noprecompute": dict(precompute_adaln=False),  # ... one matmul per network call
    # UNet: the resnets' time projections in one matmul, the cross-attention keys and values in another
    # (default on CUDA)
    "cond": dict(fuse_conditioning=True),
    "nocond": dict(fuse_conditioning=False),  # ... one matmul per layer
    # UNet, channels-last: the convolution biases in GEMM epilogues, the time embedding and the shortcut GEMM
    # (default on CUDA with channels-last since run 5)
    "convbias": dict(fuse_conv_bias=True),
    "noconvbias": dict(fuse_conv_bias=False),  # ... each bias in its own element-wise kernel
    # DiT: each residual and the adaLN norm after it in one Triton kernel (the default since run 4) ...
    "resnorm": dict(kernel_ops={"adaln_modulate": "triton"}),
    "pair": dict(kernel_ops={"adaln_modulate": "triton_pair"}),  # ... or the residual's kernel, then the norm's
    # SD: each attention's residual and the LayerNorm after it in one Triton kernel (default: torch)
    "resln": dict(kernel_ops={"layer_norm": "triton"}),
    "allk": dict(kernel_ops="all"),  # every fused op on its Triton kernel (not the measured per-op table)
    "tune": dict(kernel_ops="tune"),  # every fused layer measures its implementations on its first call
    "gnext": dict(kernel_ops={"group_norm": "cuda_ext"}),  # GroupNorm from the CUDA C++ extension
    "gnrows": dict(kernel_ops={"group_norm": "triton_rows"}),  # GroupNorm's "rows" strategy (three launches)
    "geglu": dict(kernel_ops={"geglu": "triton"}),  # SD's feed-forward GEGLU as one Triton kernel (default on CUDA)
    "nogeglu": dict(kernel_ops={"geglu": "torch"}),  # ... as torch's chunk + gelu + mul
    "upd": dict(kernel_ops={"sampler_update": "triton"}),  # the samplers' fused state update on Triton
    "updext": dict(kernel_ops={"sampler_update": "cuda_ext"}),  # ... from the CUDA C++ extension
    # backend "compile" only: Inductor autotunes every GEMM (fastdiff's graphs replace Inductor's own)
    "autotune": dict(compile_mode="max-autotune"),
    "flash": dict(sdpa_backend="flash"),  # SDPA pinned to FlashAttention (else SDPA's own choice)
    "efficient": dict(sdpa_backend="efficient"),
    # attention through TMA descriptors (Hopper+; a DiT's default on CUDA since run 4)
    "tma": dict(kernel_ops={"attention": "triton_tma"}),
    "tattn": dict(kernel_ops={"attention": "triton"}),  # attention on the Triton pointer kernel
    "sdpa": dict(kernel_ops={"attention": "torch"}),  # attention on torch's SDPA (its own backend choice)
    "cudnnbench": dict(cudnn_benchmark=True),  # cuDNN times its convolution algorithms per new shape
}


def parse_backend_variants(text: str) -> list[tuple[str, str, dict]]:
    """``"eager,triton+loop+qkv"`` -> [(label, backend, OptimizeConfig switches), ...]."""
    from ..errors import BadArgumentError
    from ..runtime.config import BACKENDS, OptimizeConfig

    out = []
    for label in _parse_list(text, "--backends"):
        backend, *mods = label.split("+")
        if backend not in BACKENDS:
            raise BadArgumentError(f"--backends: expected names from {list(BACKENDS)}, found {backend!r}")
        switches: dict = {}
        if len(set(mods)) < len(mods):
            raise BadArgumentError(f"--backends: {label!r}: a switch appears twice")
        for m in mods:
            if m not in VARIANT_SWITCHES:
                raise BadArgumentError(f"--backends: {label!r}: expected switches from {list(VARIANT_SWITCHES)} "
                                       f"after '+', found {m!r}")
            new = dict(VARIANT_SWITCHES[m])
            ops = switches.get("kernel_ops"), new.get("kernel_ops")
            if isinstance(ops[0], dict) and isinstance(ops[1], dict):  # per-op choices combine (+gnext+upd)
                new["kernel_ops"] = {**ops[0], **ops[1]}
                if len(new["kernel_ops"]) < len(ops[0]) + len(ops[1]):
                    raise BadArgumentError(f"--backends: {label!r}: two switches choose the same op")
            # (two switches setting one option: +qkv+noqkv ran one of them under a label naming both)
            clash = {k for k in set(switches) & set(VARIANT_SWITCHES[m]) if switches[k] != VARIANT_SWITCHES[m][k]}
            clash -= {"kernel_ops"} if isinstance(ops[0], dict) and isinstance(ops[1], dict) else set()
            if clash:
                raise BadArgumentError(f"--backends: {label!r}: choose one of "
                                       f"{' and '.join('+' + k for k, v in VARIANT_SWITCHES.items() if clash & set(v))}")
            switches.update(new)
        try:  # a combination the config refuses (e.g. +autotune on a backend other than compile) fails here
            OptimizeConfig(backend=backend, **switches)
        except BadArgumentError as e:
            raise BadArgumentError(f"--backends: {label!r}: {e}") from None
        out.append((label, backend, switches))
    return out


def _parse_batches(text: str) -> list[int]:
    from ..errors import BadArgumentError

    out = []
    for s in _parse_list(text, "--batch"):
        try:
            b = int(s)
        except ValueError:
            b = 0
        if b < 1:
            raise BadArgumentError(f"--batch: expected positive integers like 1,4,16, found {s!r}")
        out.append(b)
    return out


# ---------------------------------------------------------------------------------------------------
# Conditioning shared by fastdiff and diffusers (same labels, same text states)
# ---------------------------------------------------------------------------------------------------

def _conditioning(spec, b: int, cfg: float, seed: int, device, dtype, control=None):
    """dict of (labels, null_labels, states, negative_states, text_embeds, negative_text_embeds, control_image) for
    batch b (None where not used; SDXL-style models get random pooled embeddings and their default time ids;
    ``control``: what drives the network (``conditioning_channels``, ``image_downscale``): a random control image
    in [0, 1])."""
    import torch

    cond = {"labels": None, "null_labels": None, "states": None, "negative_states": None, "text_embeds": None,
            "negative_text_embeds": None, "control_image": None}
    if control is not None:
        (h, w), f = spec.sample_size, control.image_downscale
        g = torch.Generator().manual_seed(seed + 2)
        image = torch.rand(b, control.conditioning_channels, f * h, f * w, generator=g)
        cond["control_image"] = image.to(device, dtype)
    if spec.num_classes:
        cond["labels"] = torch.arange(b, device=device) % spec.num_classes
        if spec.null_class is not None:
            cond["null_labels"] = torch.full((b,), spec.null_class, device=device, dtype=torch.long)
    if spec.cross_attention_dim:
        g = torch.Generator().manual_seed(seed + 1)
        shape = (b, spec.text_tokens, spec.cross_attention_dim)
        cond["states"] = torch.randn(shape, generator=g).to(device, dtype)
        cond["negative_states"] = torch.randn(shape, generator=g).to(device, dtype)
        if spec.text_embeds_dim:
            cond["text_embeds"] = torch.randn(b, spec.text_embeds_dim, generator=g).to(device, dtype)
            cond["negative_text_embeds"] = torch.randn(b, spec.text_embeds_dim, generator=g).to(device, dtype)
    return cond


# ---------------------------------------------------------------------------------------------------
# fastdiff side
# ---------------------------------------------------------------------------------------------------

class _CountCalls:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def _bench_fastdiff(args, label: str, backend: str, switches: dict, batches, device, log, on_row=None,
                    note: str | None = None) -> list[dict]:
    """Rows for one fastdiff variant (``note`` added to each): every row passed to ``on_row`` when it is made."""
    import fastdiff

    from ..errors import BackendUnavailableError
    from ..runtime.config import OptimizeConfig
    from ..runtime.timing import measure
    from .generate import check_backend

    def emit(row):
        if note:
            row.setdefault("notes", []).append(note)
        if on_row is not None:
            on_row(row)
        return row

    base = {"backend": label}
    try:
        check_backend(backend, device)
        pipe = fastdiff.load(args.model, device=device, **load_options(args))
        if args.controlnet is not None:
            pipe.set_controlnet(bench_controlnet(pipe, args.controlnet, args.seed))
        t0 = time.perf_counter()
        pipe.optimize(OptimizeConfig(backend=backend, dtype=args.dtype, batch_buckets=tuple(batches), **switches))
        _sync(device)
        optimize_s = time.perf_counter() - t0
    except (BackendUnavailableError, ImportError) as e:
        return [emit(dict(base, batch=b, status="skipped", reason=_one_line(e))) for b in batches]
    except Exception as e:  # a backend that breaks must not hide the others
        return [emit(dict(base, batch=b, status="failed", reason=f"{type(e).__name__}: {_one_line(e)}",
                          detail=traceback.format_exc(limit=3))) for b in batches]
    rows = []
    for b in batches:
        log(f"  {label:12s} batch {b} ...")
        row = dict(base, batch=b, optimize_s=optimize_s, notes=list(pipe.notes))
        try:
            cond = _conditioning(pipe.spec, b, args.cfg, args.seed, device, pipe._network_dtype(),
                                 control=pipe._control_format())
            kw = dict(n=b, steps=args.steps, sampler=args.sampler, schedule=args.schedule, cfg_scale=args.cfg,
                      seed=args.seed, progress=False, class_labels=cond["labels"],
                      encoder_hidden_states=cond["states"],
                      negative_encoder_hidden_states=cond["negative_states"] if args.cfg != 1.0 else None,
                      **({} if cond["text_embeds"] is None else dict(
                          text_embeds=cond["text_embeds"],
                          negative_text_embeds=cond["negative_text_embeds"] if args.cfg != 1.0 else None)),
                      **({} if cond["control_image"] is None else dict(control_image=cond["control_image"])))
            counter = _CountCalls(pipe.runner)

            def first_call():  # the true first call: timed as such, and counts the network evaluations
                pipe.runner = counter
                try:
                    return pipe.generate(**kw)
                finally:
                    pipe.runner = counter.fn

            from ..controlnet import evaluations

            replays = []  # the captured loop's launch host time of each timed call

            def timed_call():
                out = pipe.generate(**kw)
                if pipe.loop_graphs is not None and pipe.loop_graphs.last_replay_host_s is not None:
                    replays.append(pipe.loop_graphs.last_replay_host_s)
                return out

            m = measure(timed_call, device, warmup=args.warmup, repeat=args.repeat, first=first_call)
            # a loop variant's first call records, warms up and captures its loop: 4 runs of the network; its
            # evaluations are the plan's
            nfe = counter.calls if pipe.loop_graphs is None else evaluations(
                pipe.plan(args.steps, args.sampler, args.schedule))
            row.update(_row_stats(m, b, args.steps, nfe), status="ok", dtype=str(pipe._network_dtype()))
            log(_row_line(row))
            if getattr(pipe, "model", None) is not None:  # which kernel each fused op ran ("tune": per layer)
                from ..models.layers import op_backends

                row["kernels"] = op_backends(pipe.model)
            if replays:  # the launch of the captured loop alone (the rest of the host time is per-call set-up)
                row["replay_host_per_step_s"] = statistics.median(replays[-args.repeat:]) / args.steps
        except Exception as e:
            row.update(status="failed", reason=f"{type(e).__name__}: {_one_line(e)}",
                       detail=traceback.format_exc(limit=3))
        rows.append(emit(row))
    return rows


def bench_controlnet(pipe, source, seed: int):
    """The ControlNet a bench runs: a folder's; ``random``: ``ControlNet.from_unet`` of the pipe's UNet with seeded
    random zero convolutions (from_unet's zeros would make it change nothing); None: the pipe's own (its folder's
    controlnet/), or none."""
    import torch

    if source is None:
        return pipe.controlnet
    if source != "random":
        from ..checkpoints.controlnet import load_controlnet

        return load_controlnet(source)
    from ..errors import BadArgumentError
    from ..models.controlnet import ControlNet
    from ..models.unet import UNet

    if not isinstance(pipe.model, UNet):
        raise BadArgumentError(f"--controlnet random: a ControlNet made from the model's UNet, and this model is a "
                               f"{pipe.spec.kind}; give a ControlNet folder (FluxControlNetModel for FLUX.1)")
    net = ControlNet.from_unet(pipe.model)
    g = torch.Generator().manual_seed(seed + 3)  # (on the CPU: the same ControlNet whatever the device)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, *net.controlnet_cond_embedding.modules()]:
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.copy_((torch.randn(conv.weight.shape, generator=g) * 0.02).to(conv.weight))
    return net


def _row_line(row: dict) -> str:
    """The row's figures as soon as they exist: a run killed by its time limit keeps them in its log."""
    return (f"    median {row['median_s'] * 1e3:.1f} ms, p90 {row['p90_s'] * 1e3:.1f} ms, "
            f"first call {row['first_call_s']:.1f} s")


def _row_stats(m, b: int, steps: int, nfe: int) -> dict:
    s = m.stats()
    s["nfe"] = nfe
    s["per_step_s"] = s["median_s"] / steps
    # host time spent issuing one step's work (CPU launch overhead; on the CPU it is the whole step)
    s["host_per_step_s"] = s["host_median_s"] / steps if s.get("host_median_s") is not None else None
    s["per_nfe_s"] = s["median_s"] / max(nfe, 1)
    s["images_per_s"] = b / s["median_s"] if s["median_s"] > 0 else float("inf")
    return s


# ---------------------------------------------------------------------------------------------------
# diffusers side: the same weights, a diffusers-pipeline style loop
# ---------------------------------------------------------------------------------------------------

def _import_diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                               EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                               KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler,
                               LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)
    except Exception as e:
        raise ImportError(f"diffusers cannot be imported ({type(e).__name__}: {_one_line(e)})") from e
    return {
        "dpmpp_2m": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
        "dpmpp_2m_sde": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")),
        "euler": (EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
        "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
        "heun": (HeunDiscreteScheduler, dict(use_karras_sigmas=True)),
        "ddim": (DDIMScheduler, {}),
        "unipc": (UniPCMultistepScheduler, dict(use_karras_sigmas=True)),
        "plms": (PNDMScheduler, dict(skip_prk_steps=True)),
        "lms": (LMSDiscreteScheduler, dict(use_karras_sigmas=True)),
        "lcm": (LCMScheduler, {}),
        "dpm_2": (KDPM2DiscreteScheduler, dict(use_karras_sigmas=True)),
        "dpm_2_ancestral": (KDPM2AncestralDiscreteScheduler, dict(use_karras_sigmas=True)),
        "deis": (DEISMultistepScheduler, dict(use_karras_sigmas=True)),
    }


# fastdiff-only UNetConfig fields: never passed to diffusers
_UNET_FASTDIFF_ONLY = ("conditional", "extra")


def diffusers_unet(spec):
    """A diffusers UNet2DModel / UNet2DConditionModel with the config of ``spec`` (random weights)."""
    import inspect

    import diffusers

    cfg = dict(spec.model_config)
    conditional = bool(cfg.get("conditional"))
    extra = dict(cfg.get("extra") or {})
    for k in _UNET_FASTDIFF_ONLY:
        cfg.pop(k, None)
    cls = diffusers.UNet2DConditionModel if conditional else diffusers.UNet2DModel
    if conditional and cfg.get("num_attention_heads") is not None:
        # diffusers' historic naming: UNet2DConditionModel's attention_head_dim holds the head counts
        cfg["attention_head_dim"] = cfg["num_attention_heads"]
    cfg.pop("num_attention_heads", None)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in {**extra, **cfg}.items() if k in params}
    # fields the diffusers class lacks are fine at the value that class hard-wires (e.g. conv resampling)
    dropped = sorted(k for k, v in cfg.items()
                     if k not in params and v not in (None, False, 0, 1, 3, "default", "conv"))
    if dropped:
        raise ValueError(f"{cls.__name__} has no field(s) {dropped} set in the native config")
    return cls(**kwargs)


def native_dit_to_diffusers(sd: dict, depth: int, per_block: bool) -> dict:
    """Native (official-layout) DiT state dict -> diffusers DiTTransformer2DModel keys (inverse of
    ``fastdiff.checkpoints.dit.convert_diffusers_dit``): qkv split into to_q / to_k / to_v, the shared
    timestep / class embedders copied into every block (diffusers keeps one per block)."""
    import torch

    out = {}
    out["pos_embed.proj.weight"] = sd["x_embedder.proj.weight"]
    out["pos_embed.proj.bias"] = sd["x_embedder.proj.bias"]
    emb = {"t_embedder.mlp.0": "timestep_embedder.linear_1", "t_embedder.mlp.2": "timestep_embedder.linear_2",
           "y_embedder.embedding_table": "class_embedder.embedding_table"}
    for i in range(depth):
        n, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for nk, dk in emb.items():
            for suffix in (".weight", ".bias"):
                src = (n + nk + suffix) if (per_block and i > 0) else (nk + suffix)
                if src in sd:
                    out[f"{d}norm1.emb.{dk}{suffix}"] = sd[src]
        out[d + "norm1.linear.weight"] = sd[n + "adaLN_modulation.1.weight"]
        out[d + "norm1.linear.bias"] = sd[n + "adaLN_modulation.1.bias"]
        for suffix in (".weight", ".bias"):
            if n + "attn.qkv" + suffix in sd:
                q, k, v = torch.chunk(sd[n + "attn.qkv" + suffix], 3, dim=0)
                out[d + "attn1.to_q" + suffix], out[d + "attn1.to_k" + suffix], out[d + "attn1.to_v" + suffix] = q, k, v
        out[d + "attn1.to_out.0.weight"] = sd[n + "attn.proj.weight"]
        out[d + "attn1.to_out.0.bias"] = sd[n + "attn.proj.bias"]
        out[d + "ff.net.0.proj.weight"] = sd[n + "mlp.fc1.weight"]
        out[d + "ff.net.0.proj.bias"] = sd[n + "mlp.fc1.bias"]
        out[d + "ff.net.2.weight"] = sd[n + "mlp.fc2.weight"]
        out[d + "ff.net.2.bias"] = sd[n + "mlp.fc2.bias"]
    out["proj_out_1.weight"] = sd["final_layer.adaLN_modulation.1.weight"]
    out["proj_out_1.bias"] = sd["final_layer.adaLN_modulation.1.bias"]
    out["proj_out_2.weight"] = sd["final_layer.linear.weight"]
    out["proj_out_2.bias"] = sd["final_layer.linear.bias"]
    return out


def diffusers_dit(spec):
    """A diffusers DiTTransformer2DModel matching ``spec`` (random weights), and a note on numerics."""
    import diffusers

    c = spec.model_config
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=c["num_heads"], attention_head_dim=c["hidden_size"] // c["num_heads"],
        in_channels=c["in_channels"], out_channels=c["in_channels"] * (2 if c["learn_sigma"] else 1),
        num_layers=c["depth"], sample_size=c["input_size"], patch_size=c["patch_size"],
        num_embeds_ada_norm=c["num_classes"], attention_bias=c["qkv_bias"],
        activation_fn="gelu-approximate" if c["mlp_act"] == "gelu_tanh" else "gelu", norm_eps=c["mlp_norm_eps"])
    note = None
    if float(c.get("freq_shift", 0.0)) != 1.0:
        note = (f"diffusers' DiT embeds timesteps with frequency shift 1, this model with {c.get('freq_shift')}: "
                f"same weights and FLOPs, outputs differ slightly (latency comparison only)")
    return model, note


def diffusers_mmdit(spec):
    """A diffusers SD3Transformer2DModel with the config of ``spec`` (random weights; fastdiff keeps its names)."""
    import diffusers

    cfg = {k: v for k, v in spec.model_config.items() if k != "extra"}
    cfg["dual_attention_layers"] = tuple(cfg["dual_attention_layers"])
    return diffusers.SD3Transformer2DModel(**cfg)


def diffusers_flux(spec):
    """A diffusers FluxTransformer2DModel with the config of ``spec`` (random weights; fastdiff keeps its names)."""
    import diffusers

    cfg = {k: v for k, v in spec.model_config.items() if k != "extra"}
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return diffusers.FluxTransformer2DModel(**cfg)


def build_diffusers_model(pipe):
    """(diffusers model holding pipe's weights, note or None)."""
    spec = pipe.spec
    sd = {k: v.detach().float().cpu() for k, v in pipe.model.state_dict().items()}
    if spec.kind == "unet":
        model, note = diffusers_unet(spec), None
    elif spec.kind == "mmdit":
        model, note = diffusers_mmdit(spec), None
    elif spec.kind == "flux":
        model, note = diffusers_flux(spec), None
    elif spec.kind == "dit":
        model, note = diffusers_dit(spec)
        sd = native_dit_to_diffusers(sd, spec.model_config["depth"], bool(spec.model_config["per_block_conditioning"]))
    else:
        raise ValueError(f"no diffusers counterpart for model kind {spec.kind!r}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not map onto the diffusers model: {len(missing)} missing "
                         f"({', '.join(list(missing)[:3])}), {len(unexpected)} unexpected ({', '.join(list(unexpected)[:3])})")
    return model.eval(), note


def _diffusers_sampler(args, spec, schedulers):
    if spec.prediction_type == "flow_prediction":
        return _diffusers_flow_sampler(args, spec)
    cls, kw = schedulers.get(args.sampler, (None, None))
    note = None
    if cls is None:
        cls, kw = schedulers["dpmpp_2m"]
        note = f"no matching diffusers scheduler for {args.sampler!r}: diffusers runs DPMSolverMultistepScheduler"
    kw, grid_note = _diffusers_grid(args.schedule, kw, spec)
    sched_cfg = {k: v for k, v in spec.scheduler.items() if not k.startswith("_")}
    return cls.from_config(sched_cfg, **kw), "; ".join(n for n in (note, grid_note) if n) or None


def _diffusers_grid(schedule, kw: dict, spec) -> tuple:
    """The diffusers scheduler options for fastdiff's ``--schedule`` (the same sigma grid on both sides), and a note
    where diffusers' scheduler has no such grid. ``kw``: the sampler's own options; ``use_karras_sigmas`` in them marks
    a scheduler that takes a sigma grid."""
    takes_sigmas = "use_karras_sigmas" in kw
    kw = {k: v for k, v in kw.items() if k != "use_karras_sigmas"}
    if schedule is None and spec.prediction_type == "edm":
        schedule = "karras"  # fastdiff's default for EDM models
    if schedule in ("karras", "exponential"):
        if takes_sigmas:
            return dict(kw, **{f"use_{schedule}_sigmas": True}), None
        return kw, f"diffusers' scheduler for this sampler has no {schedule} grid: it runs its config's spacing"
    if schedule in ("leading", "trailing", "linspace"):
        return dict(kw, timestep_spacing=schedule), None
    if schedule is not None:
        return kw, f"diffusers has no {schedule!r} grid: it runs its config's spacing"
    return kw, None  # the checkpoint's own spacing on both sides


def _diffusers_flow_sampler(args, spec):
    """A flow model's diffusers scheduler: FlowMatchEuler as configured, or a solver's flow variant (as SD3 users
    swap them in) for dpmpp_2m / unipc."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    sched_cfg = {k: v for k, v in spec.scheduler.items() if not k.startswith("_") and not k.startswith("flow_")}
    solvers = {"dpmpp_2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
    if args.sampler in solvers and spec.kind != "flux":  # (FluxPipeline hands FlowMatchEuler its own grid)
        return solvers[args.sampler](use_flow_sigmas=True, prediction_type="flow_prediction",
                                     flow_shift=float(sched_cfg.get("shift", 1.0))), None
    note = None if args.sampler in (None, "euler") else (
        f"no matching diffusers flow scheduler for {args.sampler!r}: diffusers runs FlowMatchEulerDiscreteScheduler")
    return FlowMatchEulerDiscreteScheduler.from_config(sched_cfg), note


def _diffusers_flux_generate(model, scheduler, spec, b, steps, cfg, cond, device, dtype, seed):
    """FluxPipeline's loop: packed latents, position ids, its sigma grid shifted by the resolution's mu, timestep /
    1000 and the guidance input; true CFG (cfg != 1) as one stacked batch."""
    import numpy as np
    import torch

    from ..flow import dynamic_shift_mu

    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w, c = *spec.sample_size, spec.in_channels
    x = torch.randn((b, c, h, w), generator=g).to(device)
    latents = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float().to(device)
    txt_ids = torch.zeros(cond["states"].shape[1], 3, device=device)
    s = spec.scheduler
    mu = dynamic_shift_mu(latents.shape[1], s.get("base_image_seq_len", 256), s.get("max_image_seq_len", 4096),
                          s.get("base_shift", 0.5), s.get("max_shift", 1.15)) if s.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
    guided = cfg != 1.0
    ctx = torch.cat([cond["states"], cond["negative_states"]]) if guided else cond["states"]
    pooled = torch.cat([cond["text_embeds"], cond["negative_text_embeds"]]) if guided else cond["text_embeds"]
    n = ctx.shape[0]
    guidance = torch.full((n,), 3.5, device=device) if spec.guidance_input else None
    for t in scheduler.timesteps:
        x_in = torch.cat([latents, latents]) if guided else latents
        out = model(hidden_states=x_in.to(dtype), timestep=t.expand(n).to(dtype) / 1000, guidance=guidance,
                    pooled_projections=pooled, encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=img_ids).sample
        out = out.float()
        if guided:
            cond_out, uncond_out = out.chunk(2)
            out = uncond_out + cfg * (cond_out - uncond_out)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


def _diffusers_generate(model, scheduler, spec, b, steps, cfg, cond, device, dtype, seed, controlnet=None):
    """One diffusers-pipeline style sampling loop (as DiTPipeline / StableDiffusionPipeline do; with ``controlnet``,
    as StableDiffusionControlNetPipeline does)."""
    import torch

    if spec.kind == "flux":
        return _diffusers_flux_generate(model, scheduler, spec, b, steps, cfg, cond, device, dtype, seed)

    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w = spec.sample_size
    c = spec.in_channels
    latents = torch.randn((b, c, h, w), generator=g).to(device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    guided = cfg != 1.0
    kw = {}
    if cond["labels"] is not None:
        kw["class_labels"] = torch.cat([cond["labels"], cond["null_labels"]]) if guided else cond["labels"]
    if cond["states"] is not None:
        kw["encoder_hidden_states"] = (torch.cat([cond["states"], cond["negative_states"]]) if guided
                                       else cond["states"])
    if cond["text_embeds"] is not None:  # SDXL / SD3: the pooled text (and SDXL's default time ids)
        kw["added_cond_kwargs"] = dict(text_embeds=torch.cat([cond["text_embeds"], cond["negative_text_embeds"]])
                                       if guided else cond["text_embeds"])
        if spec.time_ids_dim:
            from ..text_time import default_time_ids

            ids, neg = (torch.tensor([default_time_ids(spec.time_ids_dim, h, w, negative=n)], device=device,
                                     dtype=dtype).expand(b, -1) for n in (False, True))
            kw["added_cond_kwargs"]["time_ids"] = torch.cat([ids, neg]) if guided else ids
    for t in scheduler.timesteps:
        x_in = torch.cat([latents, latents]) if guided else latents
        if hasattr(scheduler, "scale_model_input"):  # (FlowMatch schedulers have none: SD3's pipeline skips it)
            x_in = scheduler.scale_model_input(x_in, t)
        ts = t.expand(x_in.shape[0]) if spec.kind in ("dit", "mmdit") else t
        if spec.kind == "mmdit":  # StableDiffusion3Pipeline's call
            out = model(hidden_states=x_in.to(dtype), timestep=ts, encoder_hidden_states=kw["encoder_hidden_states"],
                        pooled_projections=kw["added_cond_kwargs"]["text_embeds"]).sample
        elif spec.kind == "dit":
            out = model(x_in.to(dtype), timestep=ts, class_labels=kw["class_labels"]).sample
        elif controlnet is not None:
            image = torch.cat([cond["control_image"]] * 2) if guided else cond["control_image"]
            down, mid = controlnet(x_in.to(dtype), ts, controlnet_cond=image, conditioning_scale=1.0,
                                   return_dict=False, **kw)
            out = model(x_in.to(dtype), ts, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        **kw).sample
        else:
            out = model(x_in.to(dtype), ts, **{k: v for k, v in kw.items()}).sample
        out = out.float()
        if spec.learned_variance:
            out = out[:, :c]
        if guided:
            cond_out, uncond_out = out.chunk(2)
            out = uncond_out + cfg * (cond_out - uncond_out)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


def _bench_diffusers(args, pipe_source, compare, batches, device, log, on_row=None) -> list[dict]:
    """Rows for diffusers eager (and torch.compile of it): each row passed to ``on_row`` as soon as measured."""
    import torch

    import fastdiff

    from ..runtime.config import DTYPES
    from ..runtime.timing import measure

    impls = ["diffusers"] + (["diffusers+compile"] if "compile" in compare else [])
    try:
        schedulers = _import_diffusers()
    except ImportError as e:
        return [dict(impl=i, batch=b, status="skipped", reason=_one_line(e)) for i in impls for b in batches]
    try:
        pipe = fastdiff.load(pipe_source, device="cpu", **load_options(args))
        model, note = build_diffusers_model(pipe)
        dtype = DTYPES[args.dtype] if args.dtype else pipe.dtype  # (the checkpoint's precision, as fastdiff's)
        model = model.to(device=device, dtype=dtype)
        controlnet = None
        net = bench_controlnet(pipe, args.controlnet, args.seed)
        if net is not None:  # the same ControlNet in diffusers' class
            from ..checkpoints.controlnet import diffusers_config

            import diffusers

            config = {k: v for k, v in diffusers_config(net).items() if not k.startswith("_")}
            controlnet = diffusers.ControlNetModel.from_config(config)
            controlnet.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
            controlnet = controlnet.eval().to(device=device, dtype=dtype)
        spec = pipe.spec
        scheduler, snote = _diffusers_sampler(args, spec, schedulers)
    except Exception as e:  # no counterpart / weights that do not map: skipped; a device error is a failure
        from ..errors import FastdiffError

        status = "skipped" if isinstance(e, (ValueError, NotImplementedError, ImportError, FastdiffError)) else \
            "failed"
        return [dict(impl=i, batch=b, status=status, reason=f"diffusers model not built: {_one_line(e)}")
                for i in impls for b in batches]
    notes = [n for n in (note, snote) if n]
    rows = []
    for impl in impls:
        runner, control_runner = model, controlnet
        compile_s = None
        if impl == "diffusers+compile":
            mode = args.compile_mode or ("max-autotune" if device.type == "cuda" else "default")
            notes_c = notes + [f"torch.compile(mode={mode!r})"]
            # (one static shape per batch, as fastdiff's compile backend: not a dynamic-batch graph after the first)
            runner = torch.compile(model, mode=mode, dynamic=False)
            control_runner = None if controlnet is None else torch.compile(controlnet, mode=mode, dynamic=False)
        else:
            notes_c = notes
        for b in batches:
            log(f"  {impl:12s} batch {b} ...")
            row = dict(impl=impl, batch=b, scheduler=type(scheduler).__name__, notes=notes_c)
            try:
                cond = _conditioning(spec, b, args.cfg, args.seed, device, dtype, control=net)
                if args.cfg != 1.0 and spec.num_classes and cond["null_labels"] is None:
                    raise ValueError("cfg != 1 needs a null class label")
                fn = lambda: _diffusers_generate(runner, scheduler, spec, b, args.steps, args.cfg, cond,  # noqa: E731
                                                 device, dtype, args.seed, control_runner)
                with torch.no_grad():
                    m = measure(fn, device, warmup=args.warmup, repeat=args.repeat)
                nfe = len(scheduler.timesteps)
                row.update(_row_stats(m, b, args.steps, nfe), status="ok")
                log(_row_line(row))
            except Exception as e:
                row.update(status="failed", reason=f"{type(e).__name__}: {_one_line(e)}",
                           detail=traceback.format_exc(limit=3))
            rows.append(row)
            if on_row is not None:
                on_row(row)
        del compile_s
    return rows


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------

def _one_line(e) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device) -> None:
    """Free what the variant before still holds before the next one is measured: its pipeline sits in reference
    cycles (runner wrappers, graph caches) until the collector runs, and with it its weights and graph pools. Its
    tensors would otherwise count in the next row's peak memory (run 5: an SD1.5 row read 3485 MiB, 1754 alone)."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _ms(s):
    return "-" if s is None else f"{s * 1e3:.1f}"


def _us(s):
    return "-" if s is None else f"{s * 1e6:.0f}"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def _ratios(results, compare_rows) -> list[dict]:
    """fastdiff's median over diffusers' for each row and batch; per network evaluation where the two ran different
    counts (a sampler diffusers has no scheduler for: it runs DPM-Solver++), marked ``per_nfe``."""
    ref = {(r["impl"], r["batch"]): r for r in compare_rows if r.get("status") == "ok"}
    out = []
    for r in results:
        if r.get("status") != "ok":
            continue
        for impl in ("diffusers", "diffusers+compile"):
            d = ref.get((impl, r["batch"]))
            if d and d["median_s"]:
                per_nfe = bool(r.get("nfe") and d.get("nfe") and r["nfe"] != d["nfe"])
                ratio = r["per_nfe_s"] / d["per_nfe_s"] if per_nfe else r["median_s"] / d["median_s"]
                out.append({"backend": r["backend"], "batch": r["batch"], "vs": impl, "ratio": ratio,
                            "per_nfe": per_nfe})
    return out


def format_table(results, compare_rows, ratios) -> str:
    head = ("backend", "batch", "median ms", "p90 ms", "p99 ms", "ms/step", "host us/step", "img/s", "peak MiB",
            "1st-call +s", "optimize s", "/diffusers", "/diff+compile")
    lines = []
    rat = {(x["backend"], x["batch"], x["vs"]): x for x in ratios}
    for r in list(results) + list(compare_rows):
        name = r.get("backend") or r.get("impl")
        if r.get("status") != "ok":
            lines.append((name, str(r["batch"]), f"{r['status']}: {r.get('reason', '')}"))
            continue
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        r_ = lambda x: "-" if x is None else f"{x['ratio']:.2f}" + ("/nfe" if x.get("per_nfe") else "")  # noqa: E731
        lines.append((name, str(r["batch"]), _ms(r["median_s"]), _ms(r["p90_s"]), _ms(r["p99_s"]),
                      _ms(r["per_step_s"]), _us(r.get("host_per_step_s")), f"{r['images_per_s']:.2f}",
                      _mib(r.get("peak_memory_bytes")),
                      f"{r['warmup_overhead_s']:.2f}", f(r.get("optimize_s")),
                      r_(rat.get((name, r["batch"], "diffusers"))), r_(rat.get((name, r["batch"], "diffusers+compile")))))
    widths = [max([len(head[i])] + [len(l[i]) for l in lines if len(l) == len(head)]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.rjust(widths[i]) if i > 1 or True else c for i, c in enumerate(row))  # noqa: E731
    out = [fmt(head), "  ".join("-" * w for w in widths)]
    for l in lines:
        out.append(fmt(l) if len(l) == len(head) else f"{l[0].rjust(widths[0])}  {l[1].rjust(widths[1])}  {l[2]}")
    return "\n".join(out)


def _plot(path, results, compare_rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = {}
    for r in list(results) + list(compare_rows):
        if r.get("status") == "ok":
            series.setdefault(r.get("backend") or r.get("impl"), []).append((r["batch"], r["median_s"] * 1e3))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                linestyle="--" if name.startswith("diffusers") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("median latency per generate call (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _json_report(args, variants, batches, compare, spec, n_params, dev_name, device, results, compare_rows,
                 ratios, complete) -> dict:
    import torch

    from ..runtime.timing import memory_method
    from .info import collect

    return {
        "schema": "fastdiff-bench/1",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": complete,  # false: written after a row, more were to come
        "device": dev_name,
        "versions": collect(),
        "settings": {"model": args.model, "backends": [v[0] for v in variants], "batch": batches, "steps": args.steps,
                     "sampler": args.sampler, "schedule": args.schedule, "cfg": args.cfg, "dtype": args.dtype,
                     "warmup": args.warmup, "repeat": args.repeat, "compare": compare, "seed": args.seed,
                     "compile_mode": (args.compile_mode or ("max-autotune" if device.type == "cuda" else "default"))
                     if "compile" in compare else None,
                     "threads": torch.get_num_threads(),
                     "timing": "cuda events" if device.type == "cuda" else "perf_counter",
                     "memory": memory_method(device),
                     "measured": "one pipe.generate call (noise + sampling loop + CFG, no decode)"},
        "model": {"kind": spec.kind, "params": n_params, "in_channels": spec.in_channels,
                  "sample_size": list(spec.sample_size), "source": spec.source},
        "results": results,
        "compare": compare_rows,
        "ratios": ratios,
    }


def run(args) -> int:
    import torch

    from ..errors import BadArgumentError
    from ..runtime.timing import memory_method
    from .generate import default_device, load_pipeline

    variants = parse_backend_variants(args.backends)
    batches = _parse_batches(args.batch)
    if args.threads is not None:
        if args.threads < 1:
            raise BadArgumentError(f"--threads: expected a positive integer, found {args.threads}")
        torch.set_num_threads(args.threads)
    _refuse_other_mode(args)
    if not math.isfinite(args.cfg):
        raise BadArgumentError(f"--cfg: expected a finite number, found {args.cfg}")
    # before any run: a finished run must never fail on its output
    _check_output("--json", args.json, ())
    _check_output("--plot", args.plot, _plot_extensions() if args.plot else ())
    if args.quality:
        return run_quality(args)
    compare = _parse_list(args.compare, "--compare", COMPARE_CHOICES) if args.compare else []
    if compare and "diffusers" not in compare:
        raise BadArgumentError("--compare compile times torch.compile of the diffusers model: use "
                               "--compare diffusers,compile")
    for name in ("steps", "repeat"):
        if getattr(args, name) < 1:
            raise BadArgumentError(f"--{name}: expected a positive integer, found {getattr(args, name)}")
    if args.warmup < 1:
        raise BadArgumentError(f"--warmup: expected >= 1 (the first call is always a warm-up), found {args.warmup}")
    device = default_device(args.device)
    if device.type == "cuda" and device.index is not None:  # (CUDA events and graphs are recorded on the current one)
        torch.cuda.set_device(device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    # validate the model and the conditioning once, before any timing
    probe = load_pipeline(args.model, "cpu", **load_options(args))
    spec = probe.spec
    if args.cfg != 1.0 and spec.num_classes and spec.null_class is None:
        raise BadArgumentError("--cfg != 1 needs an unconditional (null) class label, and this model has none")
    if args.cfg != 1.0 and not spec.num_classes and not spec.cross_attention_dim:
        raise BadArgumentError("--cfg != 1 needs a conditional model (class labels or text states)")
    if args.controlnet is not None and (spec.kind != "unet" or not spec.cross_attention_dim):
        raise BadArgumentError(f"--controlnet: a ControlNet drives a text-conditioned UNet, and {args.model} is a "
                               f"{spec.kind}")
    if args.controlnet is not None:  # (a missing or ill-fitting folder: one line now, not a failed row per variant)
        probe.set_controlnet(bench_controlnet(probe, args.controlnet, args.seed))
    if getattr(probe._control_format(), "count", None):
        raise BadArgumentError(f"{args.model}: driven by several ControlNets; the bench times one (pass --controlnet "
                               f"FOLDER with the base model)")
    if spec.latent_control:  # (its every call needs a control image: FLUX.1 dev's speed plus a wider input layer)
        raise BadArgumentError(f"{args.model}: a FLUX.1 Depth / Canny transformer; the latency bench times "
                               f"text-to-image generation: bench FLUX.1 dev")
    if spec.inpainting:  # (its every call needs an image and a mask; the network's speed is its base model's)
        raise BadArgumentError(f"{args.model}: an inpainting network; the latency bench times text-to-image "
                               f"generation: bench the base model (the same UNet with {spec.in_channels} input "
                               f"channels)")
    probe.plan(args.steps, args.sampler, args.schedule)
    # an exported graph (.onnx) has no PyTorch network to count
    n_params = sum(p.numel() for p in probe.model.parameters()) if probe.model is not None else 0
    del probe

    dev_name = str(device) if device.type != "cuda" else f"{device} {torch.cuda.get_device_name(device)}"
    log(f"fastdiff bench {args.model} ({spec.kind}, {n_params / 1e6:.2f}M params) on {dev_name}: "
        f"{args.sampler} x {args.steps} steps, cfg {args.cfg}, dtype {args.dtype or 'checkpoint'}")

    def save(results, compare_rows, complete):
        """The JSON report as it stands, written atomically: after every row, so a run cut off by a time limit
        keeps the rows it finished (``"complete": false``)."""
        if args.json:
            _write_json(args.json, _json_report(args, variants, batches, compare, spec, n_params, dev_name, device,
                                                results, compare_rows, _ratios(results, compare_rows), complete))

    results: list = []
    measured: list = []

    def keep(rows):  # each row saved when measured: a step's time limit (a long compile) may cut the run off
        def saved(row):
            rows.append(row)
            save(results, measured, complete=False)
        return saved

    for i, (label, backend, switches) in enumerate(variants):
        note = None
        if switches.get("cudnn_benchmark") and i and device.type == "cuda":
            # cuDNN keys its plan cache without the flag: earlier variants' plans are reused
            note = (f"{label}: cuDNN reuses the convolution plans the variants before it chose in this process (its "
                    f"plan cache ignores the benchmark flag); run it in a process of its own, first")
        release_memory(device)
        _bench_fastdiff(args, label, backend, switches, batches, device, log, on_row=keep(results), note=note)
    release_memory(device)
    compare_rows = _bench_diffusers(args, args.model, compare, batches, device, log,
                                    on_row=keep(measured)) if compare else []
    ratios = _ratios(results, compare_rows)

    print(format_table(results, compare_rows, ratios))
    print(f"timing: {'CUDA events' if device.type == 'cuda' else 'perf_counter'}; peak memory: {memory_method(device)}; "
          f"ratio = fastdiff / diffusers median (< 1: fastdiff faster); host us/step = CPU time issuing the call "
          f"/ steps")
    notes = sorted({n for r in list(results) + list(compare_rows) for n in r.get("notes", [])})
    for n in notes:
        print(f"note: {n}")
    if args.json:
        save(results, compare_rows, complete=True)
        log(f"wrote {args.json}")
    if args.plot:
        _plot(args.plot, results, compare_rows, f"{args.model}: {args.sampler} x {args.steps}, cfg {args.cfg}, "
                                                f"{dev_name}")
        log(f"wrote {args.plot}")
    return 1 if any(r.get("status") == "failed" for r in list(results) + list(compare_rows)) else 0


def run_quality(args) -> int:
    """``fastdiff bench --quality``: the digits-FD / accuracy vs NFE table (and curves with --plot)."""
    from ..errors import BadArgumentError
    from ..metrics.quality import format_table, quality_table
    from ..sampling import SAMPLERS
    from .generate import load_pipeline

    try:
        nfes = sorted({int(v) for v in args.nfe.split(",") if v.strip()})
    except ValueError as e:
        raise BadArgumentError(f"--nfe: expected comma-separated integers, found {args.nfe!r}") from e
    if not nfes or nfes[0] < 1:
        raise BadArgumentError(f"--nfe: expected positive integers, found {args.nfe!r}")
    # (no list: quality_table's default, every sampler the model takes)
    samplers = _parse_list(args.samplers, "--samplers", tuple(SAMPLERS)) if args.samplers else None
    if args.per_class < 2:
        raise BadArgumentError(f"--per-class: expected at least 2, found {args.per_class}")
    cfg = args.cfg if args.cfg != 1.0 else 3.0
    from .generate import default_device

    pipe = load_pipeline(args.model, default_device(args.device), **load_options(args))
    rows = quality_table(pipe, samplers, nfes, per_class=args.per_class, cfg_scale=cfg, seed=args.seed,
                         progress=lambda r: print(f"  {r.sampler:<16} NFE {r.nfe_budget:>3} ({r.steps} steps): "
                                                  f"digits-FD {r.digits_fd:7.2f}  accuracy {r.accuracy:.3f}  "
                                                  f"{r.seconds:6.1f}s", flush=True))
    print(f"quality of {args.model}: {args.per_class * 10} guided samples per cell (cfg {cfg}), seeds from "
          f"{args.seed}")
    print(format_table(rows))
    if args.json:
        _write_json(args.json, {"model": args.model, "cfg": cfg, "per_class": args.per_class,
                                "rows": [r.as_dict() for r in rows]})
        print(f"wrote {args.json}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = plt.get_cmap("tab20").colors  # 12 samplers: more distinct colours than the default cycle
        for i, s in enumerate(dict.fromkeys(r.sampler for r in rows)):
            pts = [(r.nfe, r.digits_fd) for r in rows if r.sampler == s]
            ax.plot(*zip(*pts), marker="os^vD"[i % 5], color=colors[(2 * i) % 20 + (i // 10)], label=s)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel("digits-FD (lower is better)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        _save_figure(fig, args.plot)
        print(f"wrote {args.plot}")
    return 0
