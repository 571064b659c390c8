"""ONNX -> TensorRT engine, with optimisation profiles, a timing cache and a sidecar JSON.

``build_engine(onnx_path, engine_path, batch=(1, 2, 4), ...)`` parses the ONNX file written by
``fastdiff.export.onnx.export_onnx``, sets one optimisation profile (min / opt / max of every dynamic
axis: batch, height, width, text sequence length), builds in fp16 / bf16 / fp32 and writes, atomically:

    <engine>                the serialized engine
    <engine>.json           sidecar: TensorRT version, GPU name + compute capability, precision,
                            profiles, sha256 of the source ONNX (+ its .data) and of the engine,
                            the ModelSpec and graph interface from the ONNX metadata

An engine only runs on the TensorRT version and GPU architecture it was built for. ``engine_status``
compares the sidecar with this machine (and the ONNX file, when given); ``build_engine(rebuild="auto")``
rebuilds a stale engine, ``rebuild="never"`` refuses it with what differs.

TensorRT is imported only inside the functions that need it; asking for it where it is missing (or
where there is no CUDA GPU) raises BackendUnavailableError with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from fastdiff.errors import BackendUnavailableError, BadArgumentError, UnsupportedConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
SIDECAR_SUFFIX = ".json"
DEFAULT_SEQUENCE = 77  # CLIP text length: the usual encoder_hidden_states length
DEFAULT_BATCH = (1, 1, 4)  # a dynamic batch's profile when none is given (a static batch keeps its size)


def tensorrt_available() -> tuple:
    """(usable, reason): tensorrt imports and torch sees a CUDA GPU."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "tensorrt not installed (pip install tensorrt; needs an NVIDIA GPU and driver)"
    except Exception as e:  # installed but broken (e.g. no libnvinfer / driver)
        return False, f"tensorrt not importable ({e.__class__.__name__}: {e})"
    import torch

    if not torch.cuda.is_available():
        return False, "TensorRT needs a CUDA GPU and torch sees none"
    return True, "ok"


def require_tensorrt():
    """The tensorrt module, or BackendUnavailableError saying why it cannot be used here."""
    ok, why = tensorrt_available()
    if not ok:
        raise BackendUnavailableError(f"backend 'tensorrt' was requested but {why}")
    import tensorrt

    return tensorrt


@dataclass
class EngineResult:
    path: str
    size_bytes: int
    seconds: float
    built: bool  # False: an up-to-date engine was already there
    sidecar: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------------

def parse_range(value, name: str) -> Optional[tuple]:
    """``4`` / ``"4"`` -> (4, 4, 4); ``"1:4:8"`` / (1, 4, 8) -> (1, 4, 8); ``"1:8"`` -> (1, 8, 8); None -> None."""
    if value is None:
        return None
    if isinstance(value, int):
        parts = [value]
    elif isinstance(value, str):
        try:
            parts = [int(v) for v in value.split(":")]
        except ValueError:
            raise BadArgumentError(f"{name}: expected N or MIN:OPT:MAX (ints), found {value!r}") from None
    else:
        parts = [int(v) for v in value]
    if len(parts) == 1:
        parts = parts * 3
    elif len(parts) == 2:
        parts = [parts[0], parts[1], parts[1]]
    if len(parts) != 3 or min(parts) < 1 or not parts[0] <= parts[1] <= parts[2]:
        raise BadArgumentError(f"{name}: expected MIN <= OPT <= MAX, all >= 1, found {value!r}")
    return tuple(parts)


def text_sequence(spec) -> Optional[tuple]:
    """The text-length profile (min, opt, max) for a text-conditioned model's engine, None for others: any prompt
    length from 1 to 4 x 77 tokens for CLIP models (77 the optimum); SD3's and Flux's pipelines' own lengths (333 =
    77 CLIP + 256 T5, up to 77 + 512; Flux's 512 T5 tokens)."""
    if not spec.cross_attention_dim:
        return None
    return {333: (1, 333, 589), 512: (1, 512, 512)}.get(spec.text_tokens, (1, DEFAULT_SEQUENCE, 4 * DEFAULT_SEQUENCE))


def onnx_input_dims(onnx_path: str) -> dict:
    """input name -> list of dims (int, or the symbolic name for a dynamic axis)."""
    import onnx

    proto = onnx.load(onnx_path, load_external_data=False)
    init = {t.name for t in proto.graph.initializer}
    out = {}
    for vi in proto.graph.input:
        if vi.name in init:
            continue
        out[vi.name] = [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
    return out


def make_profiles(onnx_path: str, batch=None, height=None, width=None, sequence=None) -> dict:
    """name -> (min, opt, max) shapes for every input of a fastdiff ONNX graph.

    batch / height / width / sequence: N or (min, opt, max); batch defaults to (1, 1, 4) for a dynamic batch;
    height / width are needed only when the graph has dynamic height / width (the size the graph was traced at is
    unknown then, so they must be given); sequence defaults to 77 (CLIP). A range over an axis the graph fixed is
    refused.
    """
    b = parse_range(DEFAULT_BATCH if batch is None else batch, "batch")
    ranges = {"batch": b, "height": parse_range(height, "height"), "width": parse_range(width, "width"),
              "sequence": parse_range(sequence if sequence is not None else DEFAULT_SEQUENCE, "sequence")}
    from fastdiff.export.onnx import read_onnx_io

    control = read_onnx_io(onnx_path).get("control")
    for axis in ("height", "width"):  # a ControlNet's image, in pixels: the latents' range times its downscale
        if control and ranges[axis] is not None:
            ranges["control_" + axis] = tuple(v * control["image_downscale"] for v in ranges[axis])
    profiles, dynamic = {}, set()
    dims_of = onnx_input_dims(onnx_path)
    fixed = (dims_of.get("sample") or [None])[0]
    # timestep / guidance_scale: (1,) or one per sample, and the runners send one per sample: up to the graph's own
    # batch where it fixed one
    per_sample = (1, fixed, fixed) if isinstance(fixed, int) and fixed > 0 else (1, b[1], b[2])
    for name, dims in dims_of.items():
        mins, opts, maxs = [], [], []
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                r = (d, d, d)
            elif isinstance(d, str) and d.endswith("_batch"):
                r = per_sample
            elif d in ranges and ranges[d] is not None:
                r = ranges[d]
                dynamic.add(d)
            else:
                raise BadArgumentError(f"input {name!r} axis {i} is dynamic ({d!r}): give its min:opt:max "
                                       f"(--height / --width for a dynamic-resolution graph)")
            mins.append(r[0]), opts.append(r[1]), maxs.append(r[2])
        profiles[name] = (tuple(mins), tuple(opts), tuple(maxs))
    if sequence is not None and not any(d == "sequence" for dims in dims_of.values() for d in dims):
        raise BadArgumentError(f"sequence: a text-length profile given ({sequence}), found a graph with no text input")
    given = {"batch": batch is not None, "height": True, "width": True}
    for axis in ("batch", "height", "width"):  # a range over an axis the graph fixed would be silently one size
        r = ranges[axis]
        if given[axis] and r is not None and r[0] != r[2] and axis not in dynamic:
            how = "batch (no --static-batch)" if axis == "batch" else "height / width (--dynamic-hw)"
            raise BadArgumentError(f"{axis}: a MIN:OPT:MAX range ({r[0]}:{r[1]}:{r[2]}) needs a dynamic {axis} axis, "
                                   f"found one fixed in this graph; give one size, or export with a dynamic {how}")
    return profiles


# ---------------------------------------------------------------------------------------------------
# Sidecar and staleness
# ---------------------------------------------------------------------------------------------------

def file_sha256(path: str) -> str:
    """sha256 of an ONNX file and, when present, its external-data file ``<path>.data``."""
    h = hashlib.sha256()
    for p in (path, path + ".data"):
        if os.path.exists(p):
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def current_environment() -> dict:
    """TensorRT version and GPU of this machine (needs tensorrt and CUDA)."""
    trt = require_tensorrt()
    import torch

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"tensorrt": trt.__version__, "gpu": p.name, "compute_capability": f"{p.major}.{p.minor}"}


def read_sidecar(engine_path: str) -> Optional[dict]:
    p = engine_path + SIDECAR_SUFFIX
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def compare_sidecar(sidecar: Optional[dict], env: dict, *, onnx_sha256: Optional[str] = None,
                    engine_sha256: Optional[str] = None, precision: Optional[str] = None,
                    profiles: Optional[dict] = None) -> tuple:
    """(fresh, reason): whether an engine described by ``sidecar`` is usable in ``env`` for these inputs.

    Pure (no TensorRT needed): the checks ``engine_status`` runs, testable anywhere.
    """
    if sidecar is None:
        return False, "no sidecar JSON beside the engine (cannot tell what it was built for)"
    diffs = []
    for key, label in (("tensorrt", "TensorRT"), ("compute_capability", "compute capability"), ("gpu", "GPU")):
        if str(sidecar.get(key)) != str(env.get(key)):
            diffs.append(f"{label}: built for {sidecar.get(key)}, this machine has {env.get(key)}")
    if onnx_sha256 is not None and sidecar.get("onnx_sha256") != onnx_sha256:
        diffs.append("the source ONNX changed since the build (sha256 differs)")
    if engine_sha256 is not None and sidecar.get("engine_sha256") != engine_sha256:
        diffs.append("the engine file does not match its sidecar (sha256 differs: an interrupted rebuild?)")
    if precision is not None and sidecar.get("precision") != precision:
        diffs.append(f"precision: built as {sidecar.get('precision')}, asked for {precision}")
    if profiles is not None:
        want = {k: [list(s) for s in v] for k, v in profiles.items()}
        if sidecar.get("profiles") != want:
            diffs.append(f"profiles: built for {sidecar.get('profiles')}, asked for {want}")
    return (not diffs), ("; ".join(diffs) if diffs else "up to date")


def engine_status(engine_path: str, onnx_path: Optional[str] = None, *, precision=None, profiles=None) -> tuple:
    """(fresh, reason) for the engine at ``engine_path`` on this machine."""
    if not os.path.isfile(engine_path):
        return False, f"no engine at {engine_path}"
    return compare_sidecar(read_sidecar(engine_path), current_environment(),
                           onnx_sha256=file_sha256(onnx_path) if onnx_path else None,
                           engine_sha256=file_sha256(engine_path), precision=precision, profiles=profiles)


# ---------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------

def build_engine(onnx_path: str, engine_path: str, *, batch=None, height=None, width=None, sequence=None,
                 precision: str = "fp16", timing_cache: Optional[str] = None, workspace_gb: Optional[float] = None,
                 rebuild: str = "auto", progress: bool = True) -> EngineResult:
    """Build (or reuse) a TensorRT engine for a fastdiff ONNX graph; see the module docstring.

    batch / height / width / sequence: N or (min, opt, max), or "MIN:OPT:MAX".
    precision: "fp16" | "bf16" (reduced-precision kernels allowed; the graph's fp32 parts may stay fp32)
        or "fp32". timing_cache: a file read before and updated after the build (speeds up rebuilds).
    rebuild: "auto" (rebuild when missing or stale), "always", or "never" (refuse a stale engine).
    """
    if precision not in PRECISIONS:
        raise BadArgumentError(f"precision must be one of {PRECISIONS}, found {precision!r}")
    if rebuild not in ("auto", "always", "never"):
        raise BadArgumentError(f"rebuild must be 'auto', 'always' or 'never', found {rebuild!r}")
    onnx_path, engine_path = os.fspath(onnx_path), os.fspath(engine_path)
    if not os.path.isfile(onnx_path):
        raise BadArgumentError(f"no such ONNX file: {onnx_path}")
    from fastdiff.utils.atomic import atomic_path, check_file_path

    check_file_path(engine_path)
    if timing_cache:  # checked before minutes of building, not when writing it afterwards
        check_file_path(os.fspath(timing_cache))
    trt = require_tensorrt()
    t0 = time.perf_counter()
    profiles = make_profiles(onnx_path, batch, height, width, sequence)
    if rebuild != "always" and os.path.isfile(engine_path):
        fresh, why = engine_status(engine_path, onnx_path, precision=precision, profiles=profiles)
        if fresh:
            return EngineResult(engine_path, os.path.getsize(engine_path), time.perf_counter() - t0, False,
                                read_sidecar(engine_path))
        if rebuild == "never":
            raise BadArgumentError(f"TensorRT engine {engine_path} is stale: {why}; rebuild it "
                                   f"(build_engine(..., rebuild='auto') or fastdiff export --format tensorrt)")

    from .trt_supported_ops import static_check

    problems = static_check(onnx_path)
    if problems:
        raise UnsupportedConfigError("ONNX graph", os.path.basename(onnx_path), supported="; ".join(problems),
                                     model="TensorRT build")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UnsupportedConfigError("ONNX graph", onnx_path, supported=f"TensorRT parser errors: {errors[:3]}",
                                     model="TensorRT build")
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision in ("fp16", "bf16"):
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:  # BF16 came in TensorRT 9; both weak-typing flags went in TensorRT 11
            raise BackendUnavailableError(
                f"a {precision} engine is built with TensorRT's {precision.upper()} builder flag (TensorRT 9 to 10), "
                f"found TensorRT {trt.__version__} without it")
        config.set_flag(flag)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in profiles.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    cache_bytes = b""
    if timing_cache and os.path.isfile(timing_cache):
        with open(timing_cache, "rb") as f:
            cache_bytes = f.read()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU is ignored, not fatal

    bar = _stage_bar(progress, f"tensorrt build {os.path.basename(engine_path)}")
    serialized = builder.build_serialized_network(network, config)
    if bar is not None:
        bar.update(1)
        bar.close()
    if serialized is None:
        raise UnsupportedConfigError("ONNX graph", onnx_path, supported="a network TensorRT can build (see the "
                                     "TensorRT log above)", model="TensorRT build")
    data = bytes(serialized)

    from fastdiff import __version__
    from fastdiff.export.onnx import read_onnx_io, read_onnx_spec

    try:
        spec = read_onnx_spec(onnx_path).to_dict()
    except BadArgumentError:
        spec = None
    sidecar = dict(current_environment(), fastdiff=__version__, precision=precision,
                   profiles={k: [list(s) for s in v] for k, v in profiles.items()},
                   onnx_path=os.path.abspath(onnx_path), onnx_sha256=file_sha256(onnx_path),
                   engine_sha256=hashlib.sha256(data).hexdigest(), spec=spec, io=read_onnx_io(onnx_path),
                   built_seconds=round(time.perf_counter() - t0, 2))
    # Engine first, sidecar last: a crash in between leaves a sidecar whose engine_sha256 no longer
    # matches, which engine_status reports as stale.
    with atomic_path(engine_path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    with atomic_path(engine_path + SIDECAR_SUFFIX) as tmp, open(tmp, "w") as f:
        json.dump(sidecar, f, indent=2)
    if timing_cache:  # after the engine: a failure here never costs the build
        with atomic_path(timing_cache) as tmp, open(tmp, "wb") as f:
            f.write(bytes(config.get_timing_cache().serialize()))
    return EngineResult(engine_path, len(data), time.perf_counter() - t0, True, sidecar)


def _stage_bar(enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=1, desc=desc, leave=False, bar_format="{desc}: {elapsed}")


__all__ = ["PRECISIONS", "EngineResult", "tensorrt_available", "require_tensorrt", "parse_range", "make_profiles",
           "build_engine", "engine_status", "compare_sidecar", "read_sidecar", "file_sha256",
           "current_environment"]
