"""The optional CUDA C++ extension (csrc/), behind one guarded module.

Nothing else in fastdiff imports the compiled extension: code asks ``fastdiff.cuda_ext.HAS_CUDA_EXT`` and
calls the ops here. The extension is never built implicitly; build it with

    python -m fastdiff.cuda_ext build          # or FASTDIFF_BUILD_CUDA_EXT=1 in the environment

which compiles csrc/ with ``torch.utils.cpp_extension.load`` into a build folder outside the source tree
(``$FASTDIFF_CACHE`` or ``~/.cache/fastdiff``, one sub-folder per torch / CUDA / source hash). After that
``HAS_CUDA_EXT`` finds the built module there. Nothing is looked up at import time: ``HAS_CUDA_EXT`` is
resolved on first access (PEP 562), so importing this module never touches a device or a compiler.

Ops (CUDA tensors only; each has a plain-torch reference beside it, the oracle for GPU tests):

- ``group_norm_nhwc(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False)`` for channels-last
  (B, C, H, W) tensors;
- ``sampler_update(x, x0, prev=None, noise=None, a=1, b=0, c=0, d=0, out=None)`` =
  ``a*x + b*x0 + c*prev + d*noise`` in one kernel.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from .errors import BackendUnavailableError

__all__ = ["HAS_CUDA_EXT", "unavailable_reason", "build", "group_norm_nhwc", "sampler_update",
           "group_norm_nhwc_reference", "sampler_update_reference", "SOURCES"]

NAME = "fastdiff_cuda_ext"
BUILD_ENV = "FASTDIFF_BUILD_CUDA_EXT"
# csrc/ sits next to the fastdiff package in the source tree (the project is used installed editable)
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("binding.cpp", "fastdiff_kernels.cu")
HEADERS = ("fastdiff_kernels.h",)

_state: dict = {}  # "module" -> the loaded extension or None, "reason" -> why not


def _source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        p = CSRC / name
        h.update(name.encode())
        h.update(p.read_bytes() if p.exists() else b"<missing>")
    return h.hexdigest()[:12]


def build_dir() -> Path:
    """Where the extension is (or would be) built: outside the source tree, keyed by torch, CUDA and sources."""
    root = Path(os.environ.get("FASTDIFF_CACHE", Path.home() / ".cache" / "fastdiff"))
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda or 'none'}-{_source_hash()}"
    return root / "cuda_ext" / tag


def _why_not_buildable() -> Optional[str]:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not all((CSRC / s).exists() for s in SOURCES):
        return f"the CUDA sources are not in {CSRC} (a non-editable install does not ship csrc/)"
    return None


def _import_built(path: Path):
    so = next(iter(sorted(path.glob(f"{NAME}*.so")) + sorted(path.glob(f"{NAME}*.pyd"))), None)
    if so is None:
        return None
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(so))
    spec = importlib.util.spec_from_file_location(NAME, str(so), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules[NAME] = mod
    return mod


def build(verbose: bool = False):
    """Compile csrc/ (torch.utils.cpp_extension.load) into ``build_dir()`` and load it; raises if impossible."""
    why = _why_not_buildable()
    if why:
        raise BackendUnavailableError(f"cannot build the fastdiff CUDA extension: {why}")
    from torch.utils.cpp_extension import load

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    mod = load(name=NAME, sources=[str(CSRC / s) for s in SOURCES], extra_include_paths=[str(CSRC)],
               # no -std= of our own: cpp_extension picks the standard this torch is built with (C++17 in
               # torch 2.6 and 2.11, C++20 in 2.13), and an explicit flag would stop it from raising it
               extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math"],
               build_directory=str(out), verbose=verbose)
    _state.update(module=mod, reason="ok")
    return mod


def _ext():
    """The loaded extension or None; resolved once. Builds only when FASTDIFF_BUILD_CUDA_EXT=1."""
    if "module" in _state:
        return _state["module"]
    mod, reason = None, None
    why = _why_not_buildable()
    if why:
        reason = why
    else:
        try:
            if os.environ.get(BUILD_ENV) == "1":
                mod = build()
            else:
                mod = _import_built(build_dir())
                if mod is None:
                    reason = f"not built (run `python -m fastdiff.cuda_ext build` or set {BUILD_ENV}=1)"
        except Exception as e:  # a failed build / load falls back: the package works without it
            reason = f"{e.__class__.__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    _state.update(module=mod, reason=reason or "ok")
    return mod


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded, else why not (for ``fastdiff info``)."""
    return None if _ext() is not None else _state["reason"]


def __getattr__(name: str):
    if name == "HAS_CUDA_EXT":
        return _ext() is not None
    raise AttributeError(f"module 'fastdiff.cuda_ext' has no attribute {name!r}")


def _require():
    mod = _ext()
    if mod is None:
        raise BackendUnavailableError(f"the fastdiff CUDA extension is not available: {_state['reason']}")
    return mod


# ------------------------------------------------------------------------------------------------ ops
def group_norm_nhwc(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm (+ SiLU) of a (B, C, H, W) CUDA tensor, computed and returned channels-last."""
    return _require().group_norm_nhwc(x, int(num_groups), weight, bias, float(eps), bool(silu))


def sampler_update(x: torch.Tensor, x0: torch.Tensor, prev: Optional[torch.Tensor] = None,
                   noise: Optional[torch.Tensor] = None, a: float = 1.0, b: float = 0.0, c: float = 0.0,
                   d: float = 0.0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a*x + b*x0 + c*prev + d*noise`` in one pass (float32 arithmetic); ``out=x`` updates in place."""
    return _require().sampler_update(x, x0, prev, noise, float(a), float(b), float(c), float(d), out)


def group_norm_nhwc_reference(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """Plain-torch oracle of ``group_norm_nhwc``."""
    h = torch.nn.functional.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    if silu:
        h = torch.nn.functional.silu(h)
    return h.to(x.dtype).contiguous(memory_format=torch.channels_last)


def sampler_update_reference(x, x0, prev=None, noise=None, a=1.0, b=0.0, c=0.0, d=0.0):
    """Plain-torch oracle of ``sampler_update``."""
    v = a * x.float() + b * x0.float()
    if prev is not None:
        v = v + c * prev.float()
    if noise is not None:
        v = v + d * noise.float()
    return v.to(x.dtype)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastdiff.cuda_ext", description="the optional CUDA extension")
    p.add_argument("command", choices=["build", "info"])
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.command == "build":
        try:
            build(verbose=a.verbose)
        except BackendUnavailableError as e:
            print(e)
            return 1
        print(f"built {NAME} in {build_dir()}")
        return 0
    reason = unavailable_reason()
    print(f"HAS_CUDA_EXT = {reason is None}" + ("" if reason is None else f" ({reason})"))
    print(f"sources: {CSRC}\nbuild dir: {build_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
