"""Where one network call's device time goes: kernels grouped by op family (GEMM, convolution, attention,
GroupNorm, ...), from torch.profiler.

The end-to-end benches give one number per variant; this says which op family to work on next. It builds
the model with fastdiff's defaults for a GPU run (``backend="triton"``, fp16, channels-last for a UNet, the
measured kernel table), runs warm-up calls at the benchmark's network batch (a batch-1 guided request: 2),
then profiles ``--calls`` calls. Graphs are off: each kernel's device time is the same inside a captured graph,
and the profiler sees eager launches on every torch version. Per-call device µs are totals over the profiled
calls divided by their number.

    python bench/profile_network.py arch:sd15-unet [--calls 5] [--batch 2] [--dtype fp16] [--top 15] [--json OUT]

On a CPU (smoke runs, tiny models) it reports the aten ops' self CPU time instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

import torch

# (family, pattern) in order: the first match names a kernel. Library kernel names (cuBLAS, cuDNN, CUTLASS,
# flash) and fastdiff's Triton kernels (their function names), or aten op names on the CPU.
FAMILIES = (
    ("attention", r"attention|fmha|flash|sdpa|softmax"),
    ("group_norm", r"group_?norm"),
    ("layer_norm / adaLN", r"layer_?norm|adaln|gated_residual"),
    ("convolution", r"conv(?!ert)|implicit_gemm|fprop|winograd|cudnn::|nchwtonhwc|nhwctonchw"),
    # before GELU: a cuBLASLt GEMM with a GELU epilogue (the DiT MLP's fc1) is a GEMM
    ("gemm", r"gemm|xmma|nvjet|cutlass|cublas|sm\d+_|addmm|aten::mm|aten::bmm|aten::linear|matmul"),
    ("geglu / gelu", r"geglu|gelu"),
    ("sampler update", r"lincomb|sampler_update"),
    ("copy / cast / cat", r"copy|(?<![a-z])cat(?![a-z])|concat|contiguous|_to_copy|clone"),
    ("elementwise", r"elementwise|vectorized|unrolled|aten::(add|mul|sub|div|silu|exp|sin|cos|where)"),
    ("reduction", r"reduce|aten::(sum|mean|std|var)"),
)
_COMPILED = [(name, re.compile(pat, re.IGNORECASE)) for name, pat in FAMILIES]


def family(kernel_name: str) -> str:
    """The op family of a kernel (or aten op) name; "other" when no pattern matches."""
    for name, pat in _COMPILED:
        if pat.search(kernel_name):
            return name
    return "other"


def aggregate(events, calls: int) -> dict:
    """{"kernels": [(name, family, µs per call, launches per call)], "families": [(family, µs per call, share)],
    "total_us": µs per call} from ``(name, self_time_us, count)`` triples totalled over ``calls`` calls."""
    per_kernel = defaultdict(lambda: [0.0, 0])
    for name, us, count in events:
        if us > 0:
            per_kernel[name][0] += us
            per_kernel[name][1] += count
    total = sum(us for us, _ in per_kernel.values())
    kernels = sorted(((n, family(n), us / calls, cnt / calls) for n, (us, cnt) in per_kernel.items()),
                     key=lambda k: -k[2])
    fam = defaultdict(float)
    for _, f, us, _ in kernels:
        fam[f] += us
    families = sorted(((f, us, us / (total / calls) if total else 0.0) for f, us in fam.items()), key=lambda f: -f[1])
    return dict(kernels=kernels, families=families, total_us=total / calls)


def _events(prof, on_cuda: bool):
    """(name, self µs, count) of every device kernel (CUDA) or aten op (CPU) the profiler recorded."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.key_averages():
        if on_cuda:
            if getattr(e, "device_type", None) != DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            if us is None:  # torch < 2.4
                us = getattr(e, "self_cuda_time_total", 0.0)
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        out.append((e.key, float(us), int(e.count)))
    return out


# the families whose kernels are torch's own generic ones: which aten op (and input shapes) launched them says
# where in the model they come from
ATTRIBUTED = ("elementwise", "copy / cast / cat")


def _ops_behind(prof, on_cuda: bool, calls: int, top: int = 12) -> list:
    """[(aten op, input shapes, µs per call, launches per call)] behind the element-wise and copy time, largest
    first: what launched the generic kernels. On a GPU each such kernel counts for the aten op that launched it
    (a convolution's bias add shows as ``aten::add_`` with the output's and the bias's shapes), whatever that
    op's name; on the CPU, the aten ops of those families by their own time."""
    if on_cuda:
        try:
            return _kernels_by_launching_op(prof, calls, top)
        except AttributeError:  # a profiler without per-event kernels: the ops' own device time below
            pass
    from torch.autograd import DeviceType

    out = []
    for e in prof.key_averages(group_by_input_shape=True):
        if getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU or not e.key.startswith("aten::"):
            continue
        if family(e.key) not in ATTRIBUTED:
            continue
        us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)) if on_cuda \
            else e.self_cpu_time_total
        if us > 0:
            out.append((e.key, str(e.input_shapes), float(us) / calls, e.count / calls))
    return sorted(out, key=lambda o: -o[2])[:top]


def _kernels_by_launching_op(prof, calls: int, top: int) -> list:
    """The generic kernels' device time grouped by the (innermost) aten op that launched them and its shapes."""
    acc = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        kernels = [k for k in e.kernels if family(k.name) in ATTRIBUTED]
        if kernels:
            entry = acc[(e.name, str(e.input_shapes))]
            entry[0] += sum(k.duration for k in kernels)
            entry[1] += len(kernels)
    out = [(name, shapes, us / calls, count / calls) for (name, shapes), (us, count) in acc.items()]
    return sorted(out, key=lambda o: -o[2])[:top]


def _network_inputs(pipe, batch: int):
    """(x, timestep, conditioning) for one network call at ``batch``, like a sampling step's."""
    spec = pipe.spec
    h, w = spec.sample_size
    dtype = pipe.dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((batch, spec.in_channels, h, w), generator=g).to(pipe.device, dtype)
    t = torch.full((batch,), 500.0, device=pipe.device)
    cond = {k: v.to(pipe.device, dtype) if v.is_floating_point() else v.to(pipe.device)
            for k, v in spec.example_conditioning(batch, g).items()}
    return x, t, cond


def profile(model: str, calls: int = 5, batch: int = 2, dtype: str = "fp16", warmup: int = 3,
            switches: str = "") -> dict:
    """``switches``: ``fastdiff bench``'s '+'-switches (e.g. "convbias+resln") on top of the GPU defaults."""
    import fastdiff

    on_cuda = torch.cuda.is_available()
    device = "cuda" if on_cuda else "cpu"
    pipe = fastdiff.load(model, device=device)
    is_unet = pipe.spec.kind == "unet"  # (channels-last: UNets only, not SD3's / FLUX.1's transformers)
    from fastdiff.commands.bench import parse_backend_variants
    from fastdiff.errors import BadArgumentError

    extra = {}
    if switches:
        if {"step", "loop"} & set(switches.split("+")):  # graphs are off here: kernels, not launches
            raise SystemExit(f"--switches: graph switches (+step, +loop) do not apply, found {switches!r}")
        try:  # as fastdiff bench reads them: per-op choices combine, clashes are refused
            extra = parse_backend_variants(("triton" if on_cuda else "eager") + "+" + switches)[0][2]
        except BadArgumentError as e:
            raise SystemExit(f"--switches: {e}") from None
    pipe.optimize(**{**dict(backend="triton" if on_cuda else "eager", dtype=dtype if on_cuda else None,
                            channels_last=on_cuda and is_unet), **extra})
    x, t, cond = _network_inputs(pipe, batch)
    with torch.no_grad():
        for _ in range(warmup):  # Triton JIT, autotuning, cuDNN / cuBLAS heuristics
            pipe.runner(x, t, **cond)
        if on_cuda:
            torch.cuda.synchronize()
        # the CPU activity too on a GPU: without it the profiler records no aten ops, and the generic kernels'
        # time cannot be traced back to the ops that launched them (_ops_behind)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for _ in range(calls):
                pipe.runner(x, t, **cond)
            if on_cuda:
                torch.cuda.synchronize()
    out = aggregate(_events(prof, on_cuda), calls)
    out["ops_behind_generic_kernels"] = _ops_behind(prof, on_cuda, calls)
    out.update(model=model, batch=batch, calls=calls, dtype=str(pipe.dtype).replace("torch.", ""),
               device=torch.cuda.get_device_name(0) if on_cuda else "cpu", timing="device" if on_cuda else "cpu",
               notes=list(pipe.notes))
    return out


def format_report(r: dict, top: int = 15) -> str:
    lines = [f"{r['model']}: one network call at batch {r['batch']}, {r['dtype']}, on {r['device']} "
             f"({r['timing']} µs per call, {r['calls']} calls profiled): {r['total_us']:.0f} µs in kernels",
             f"{'family':22s} {'µs/call':>9s} {'share':>6s}"]
    lines += [f"{f:22s} {us:9.1f} {share * 100:5.1f}%" for f, us, share in r["families"]]
    lines.append(f"{'top kernels':70s} {'family':18s} {'µs/call':>9s} {'launches':>8s}")
    for name, fam, us, count in r["kernels"][:top]:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"{short:70s} {fam:18s} {us:9.1f} {count:8.1f}")
    if r.get("ops_behind_generic_kernels"):
        lines.append(f"{'aten ops behind the ' + ' and '.join(ATTRIBUTED) + ' time (input shapes)':88s} "
                     f"{'µs/call':>9s} {'calls':>8s}")
        for op, shapes, us, count in r["ops_behind_generic_kernels"]:
            label = f"{op} {shapes}"
            label = label if len(label) <= 88 else label[:85] + "..."
            lines.append(f"{label:88s} {us:9.1f} {count:8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="e.g. arch:sd15-unet, arch:dit-xl-2-256, a checkpoint path")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--batch", type=int, default=2, help="network batch (a batch-1 guided request: 2)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--top", type=int, default=15, help="kernels listed")
    p.add_argument("--json", default=None, metavar="OUT.json")
    p.add_argument("--switches", default="", help="fastdiff bench's '+'-switches on top of the defaults, e.g. "
                                                  "convbias+resln (graph switches do not apply: graphs are off)")
    a = p.parse_args(argv)
    r = profile(a.model, a.calls, a.batch, a.dtype, switches=a.switches)
    r["switches"] = a.switches
    if not r["kernels"]:  # e.g. a CUDA profiler (CUPTI) that records no kernels
        print(f"{a.model}: the profiler recorded no {r['timing']} time", file=sys.stderr)
        return 1
    print(format_report(r, a.top))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
