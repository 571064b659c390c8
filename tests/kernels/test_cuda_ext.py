"""The optional CUDA extension: guarded import on any machine, nvcc compile-only checks, GPU parity.

- Everywhere: ``import fastdiff.cuda_ext`` works, ``HAS_CUDA_EXT`` is False without a CUDA device and the
  ops fail with BackendUnavailableError saying why.
- With nvcc: csrc/fastdiff_kernels.cu (CUDA headers only) compiles to an object for sm_80 and sm_90.
- With nvcc and torch's CUDA headers (a CUDA build of torch): csrc/binding.cpp passes a syntax check.
- With a GPU and the extension built (``python -m fastdiff.cuda_ext build`` or FASTDIFF_BUILD_CUDA_EXT=1):
  the extension equals its plain-torch reference.
"""

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from fastdiff import cuda_ext
from fastdiff.errors import BackendUnavailableError

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or $CUDA_HOME/bin)")


def test_import_is_guarded():
    assert cuda_ext.SOURCES == ("binding.cpp", "fastdiff_kernels.cu")
    if not torch.cuda.is_available():
        assert cuda_ext.HAS_CUDA_EXT is False
        assert cuda_ext.unavailable_reason()
        x = torch.zeros(1, 4, 2, 2)
        with pytest.raises(BackendUnavailableError, match="not available"):
            cuda_ext.group_norm_nhwc(x, 2)
        with pytest.raises(BackendUnavailableError, match="not available"):
            cuda_ext.sampler_update(x, x, a=0.5, b=0.5)
        with pytest.raises(BackendUnavailableError, match="cannot build"):
            cuda_ext.build()


def test_build_dir_is_outside_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    d = cuda_ext.build_dir()
    assert tmp_path in d.parents and CSRC not in d.parents and "cuda_ext" in d.parts


def test_info_command(capsys):
    assert cuda_ext.main(["info"]) == 0
    assert "HAS_CUDA_EXT" in capsys.readouterr().out


def test_references():
    x, x0, prev, noise = (torch.randn(2, 3, 4, 4) for _ in range(4))
    y = cuda_ext.sampler_update_reference(x, x0, prev, noise, a=0.9, b=0.1, c=-0.2, d=0.05)
    torch.testing.assert_close(y, 0.9 * x + 0.1 * x0 - 0.2 * prev + 0.05 * noise)
    g = cuda_ext.group_norm_nhwc_reference(x, 3, silu=True)
    assert g.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 3)))


@needs_nvcc
@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm_{a}")
def test_kernels_compile_with_nvcc(arch, tmp_path):
    obj = tmp_path / f"fastdiff_kernels_sm{arch}.o"
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-I", str(CSRC), str(CSRC / "fastdiff_kernels.cu"), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert obj.stat().st_size > 0
    cuobjdump = Path(NVCC).resolve().parent / "cuobjdump"
    if cuobjdump.exists():
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(obj)], capture_output=True, text=True).stdout
        assert f"sm_{arch}" in listing


def _nvcc_includes() -> list[str]:
    """The CUDA toolkit's include flags, as nvcc itself reports them: ``nvcc`` on PATH may be a wrapper script
    outside the toolkit (then ``<nvcc>/../include`` is the wrong folder)."""
    r = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                       capture_output=True, text=True, timeout=60)
    for line in (r.stdout + r.stderr).splitlines():
        if "INCLUDES=" in line and "SYSTEM_INCLUDES" not in line:
            return shlex.split(line.split("INCLUDES=", 1)[1])
    return [f"-I{Path(NVCC).resolve().parent.parent / 'include'}"]


def _torch_cuda_headers():
    inc = Path(torch.__file__).parent / "include"
    needed = ("ATen/cuda/CUDAContext.h", "c10/cuda/CUDAStream.h", "c10/cuda/impl/cuda_cmake_macros.h")
    missing = [h for h in needed if not (inc / h).exists()]
    return inc, missing


@needs_nvcc
def test_binding_compiles_against_torch(tmp_path):
    inc, missing = _torch_cuda_headers()
    if missing:
        pytest.skip(f"torch {torch.__version__} ships without its CUDA headers ({', '.join(missing)} missing: a "
                    "CPU wheel); binding.cpp is checked on a CUDA build of torch")
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=fastdiff_cuda_ext",
           "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}", *_nvcc_includes(),
           f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}", str(CSRC / "binding.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_extension_matches_reference_on_gpu(dtype):
    if not cuda_ext.HAS_CUDA_EXT:  # built only when asked (a build takes minutes)
        pytest.skip(f"CUDA extension not loaded: {cuda_ext.unavailable_reason()}")
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    x = (torch.randn(2, 64, 9, 7, device="cuda") + 3).to(dtype).to(memory_format=torch.channels_last)
    w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    y = cuda_ext.group_norm_nhwc(x, 8, w, b, silu=True)
    ref = cuda_ext.group_norm_nhwc_reference(x, 8, w, b, silu=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)
    xs = [torch.randn(3, 4, 77, device="cuda").to(dtype) for _ in range(4)]
    out = torch.full_like(xs[0], float("nan"))
    got = cuda_ext.sampler_update(*xs, a=0.9, b=0.1, c=-0.3, d=0.2, out=out)
    torch.testing.assert_close(got.float(), cuda_ext.sampler_update_reference(*xs, 0.9, 0.1, -0.3, 0.2).float(),
                               rtol=tol, atol=tol)
    no_prev = cuda_ext.sampler_update(xs[0], xs[1], a=0.5, b=0.5)
    torch.testing.assert_close(no_prev.float(), cuda_ext.sampler_update_reference(xs[0], xs[1], a=0.5, b=0.5).float(),
                               rtol=tol, atol=tol)


def test_package_imports_without_the_extension():
    """No module outside fastdiff/cuda_ext.py imports the compiled extension by name."""
    root = Path(__file__).resolve().parents[2]
    offenders = [str(p.relative_to(root)) for folder in ("fastdiff", "kernels", "export")
                 for p in (root / folder).rglob("*.py")
                 if p.name != "cuda_ext.py" and "fastdiff_cuda_ext" in p.read_text(errors="ignore")]
    assert not offenders, offenders
    assert sys.modules.get("fastdiff_cuda_ext") is None or torch.cuda.is_available()
