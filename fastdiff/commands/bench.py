"""``fastdiff bench``: end-to-end sampling latency per backend and batch size, optionally against diffusers.

    fastdiff bench arch:sd15-unet --backends eager,compile --batch 1,4 --steps 20 --cfg 7.5 --dtype fp16 \
        --compare diffusers,compile --json sd15.json --plot sd15.png

What is measured: one ``pipe.generate`` call (noise, the whole sampling loop, CFG included; no decoding; an
inpainting network's call (SD / SDXL inpainting UNets, FLUX.1 Fill) also encodes its masked image: a random image
and a centred mask, at strength 1; FLUX.1 Depth / Canny's, a random control image)
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

from .bench_diffusers import _bench_diffusers
from .bench_inputs import _conditioning, bench_controlnet, image_pixels
from .bench_report import (_check_output, _json_report, _one_line, _plot, _plot_extensions, _ratios, _row_line,
                           _row_stats, _save_figure, _write_json, format_table)
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
    from ..checkpoints.presets import ARCH_NAMES

    p.add_argument("model", metavar="MODEL", nargs="?", default="builtin:digits",
                   help=f"checkpoint path, builtin:NAME, or arch:NAME (random weights: {', '.join(ARCH_NAMES)}); "
                        f"default builtin:digits")
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
    # SD: each attention's residual and the LayerNorm after it in one Triton kernel (the default since run 6) ...
    "resln": dict(kernel_ops={"layer_norm": "triton"}),
    "noresln": dict(kernel_ops={"layer_norm": "torch"}),  # ... or torch's add, then its layer_norm
    "allk": dict(kernel_ops="all"),  # every fused op on its Triton kernel (not the measured per-op table)
    "tune": dict(kernel_ops="tune"),  # every fused layer measures its implementations on its first call
    "gnext": dict(kernel_ops={"group_norm": "cuda_ext"}),  # GroupNorm from the CUDA C++ extension
    "gnrows": dict(kernel_ops={"group_norm": "triton_rows"}),  # GroupNorm's "rows" strategy (three launches)
    "geglu": dict(kernel_ops={"geglu": "triton"}),  # SD's feed-forward GEGLU as one Triton kernel (default on CUDA)
    "nogeglu": dict(kernel_ops={"geglu": "torch"}),  # ... as torch's chunk + gelu + mul
    # the samplers' fused state update on Triton (a UNet's default on CUDA since run 6) ... or torch's
    "upd": dict(kernel_ops={"sampler_update": "triton"}),
    "noupd": dict(kernel_ops={"sampler_update": "torch"}),
    "updext": dict(kernel_ops={"sampler_update": "cuda_ext"}),  # ... from the CUDA C++ extension
    # backend "compile" only: Inductor autotunes every GEMM (fastdiff's graphs replace Inductor's own)
    "autotune": dict(compile_mode="max-autotune"),
    "flash": dict(sdpa_backend="flash"),  # SDPA pinned to FlashAttention (else SDPA's own choice)
    "efficient": dict(sdpa_backend="efficient"),
    # attention through TMA descriptors (Hopper+; a DiT's default on CUDA since run 4)
    "tma": dict(kernel_ops={"attention": "triton_tma"}),
    "tattn": dict(kernel_ops={"attention": "triton"}),  # attention on the Triton pointer kernel (a UNet's, run 6)
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
    from ..runtime.runners import check_backend

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
            guided = pipe.guides(args.sampler, args.cfg)  # (a CFG++ sampler's unconditional pass: at --cfg 1 too)
            cond = _conditioning(pipe.spec, b, args.cfg, args.seed, device, pipe._network_dtype(),
                                 control=pipe._control_format(), pixels=image_pixels(pipe))
            kw = dict(n=b, steps=args.steps, sampler=args.sampler, schedule=args.schedule, cfg_scale=args.cfg,
                      seed=args.seed, progress=False, class_labels=cond["labels"],
                      encoder_hidden_states=cond["states"],
                      negative_encoder_hidden_states=cond["negative_states"] if guided else None,
                      **({} if cond["text_embeds"] is None else dict(
                          text_embeds=cond["text_embeds"],
                          negative_text_embeds=cond["negative_text_embeds"] if guided else None)),
                      **({} if cond["control_image"] is None else dict(control_image=cond["control_image"])),
                      **({} if cond["image"] is None else dict(image=cond["image"]) if cond["mask"] is None
                         else dict(image=cond["image"], mask_image=cond["mask"], strength=1.0)))
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


# ---------------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------------

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
    if (spec.inpainting or spec.latent_control) and (probe.vae is None or probe.vae.encoder is None):
        raise BadArgumentError(f"{args.model}: an inpainting network without a VAE encoder, which its masked image "
                               f"needs (pass --vae FOLDER)" if spec.inpainting else
                               f"{args.model}: a FLUX.1 Depth / Canny transformer without a VAE encoder, which its "
                               f"control image needs (pass --vae FOLDER)")
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
                                                  f"{r.seconds:6.1f}s", file=sys.stderr, flush=True))
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
