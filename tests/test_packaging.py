"""The built wheel holds every subpackage (a non-editable install must have the CLI, metrics, utils)."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contains_every_package(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    try:  # without build isolation the environment's setuptools builds it: bdist_wheel since setuptools 70.1
        import setuptools.command.bdist_wheel  # noqa: F401
    except ImportError:
        pytest.importorskip("wheel", reason="building the wheel needs setuptools >= 70.1 or the wheel package")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), ROOT], check=True, cwd=str(tmp_path))
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    for folder, _, files in os.walk(os.path.join(ROOT, "fastdiff")):
        if "__init__.py" in files:
            rel = os.path.relpath(folder, ROOT).replace(os.sep, "/")
            assert f"{rel}/__init__.py" in names, f"{rel} missing from the wheel"
    for mapped in ("fastdiff/kernels/__init__.py", "fastdiff/export/__init__.py", "fastdiff/kernels/attention.py",
                   "fastdiff/export/onnx.py"):
        assert mapped in names
    presets = os.path.join(ROOT, "fastdiff", "presets")
    for name in os.listdir(presets) if os.path.isdir(presets) else []:
        for f in os.listdir(os.path.join(presets, name)):
            if f.endswith((".json", ".safetensors")):
                assert f"fastdiff/presets/{name}/{f}" in names


def test_kernel_launchers_stay_bound_after_importing_their_modules():
    """Importing ``fastdiff.kernels.group_norm`` (the module) must not replace the ``group_norm`` launcher; a
    fresh interpreter, so the imports below are the first ones (the binding happens on the first import)."""
    import subprocess
    import sys

    code = ("import importlib, fastdiff.kernels as k\n"
            "for n in ('group_norm', 'attention', 'lincomb', 'adaln'):\n"
            "    m = importlib.import_module('fastdiff.kernels.' + n)\n"
            "    assert callable(m.launch_config if n != 'adaln' else m.adaln_launch_config), n\n"
            "for n in ('group_norm', 'attention', 'attention_tma', 'lincomb', 'adaln_modulate', 'gated_residual'):\n"
            "    assert callable(getattr(k, n)) and type(getattr(k, n)).__name__ == 'function', n\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
