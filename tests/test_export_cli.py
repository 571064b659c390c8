"""``fastdiff export`` through a subprocess, as a user runs it."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

try:
    import tensorrt  # noqa: F401
    HAS_TRT = True
except ImportError:
    HAS_TRT = False


def fastdiff(*args, cwd=None):
    cmd = [sys.executable, "-c", "import sys; from fastdiff.cli import main; sys.exit(main())", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_export_onnx_prints_path_size_and_error(tmp_path):
    out = tmp_path / "unet.onnx"
    r = fastdiff("export", "arch:tiny-unet", "--format", "onnx", "-o", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    assert f"wrote {out}" in r.stdout
    size = re.search(r"size: .*\((\d+) bytes\)", r.stdout)
    assert size and int(size.group(1)) == os.path.getsize(out)
    err = re.search(r"max rel error ([0-9.e+-]+)", r.stdout)
    assert err and float(err.group(1)) <= 1e-4
    assert "export unet.onnx" in r.stderr  # the progress display
    from fastdiff.export.onnx import read_onnx_spec

    assert read_onnx_spec(str(out)).kind == "unet"


@pytest.mark.skipif(HAS_TRT, reason="tensorrt installed: the unavailable path cannot be shown")
def test_export_tensorrt_unavailable_is_one_line(tmp_path):
    r = fastdiff("export", "arch:tiny-unet", "--format", "tensorrt", "-o", str(tmp_path / "u.engine"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensorrt" in lines[0] and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args,needle", [
    (["--format", "tflite"], "invalid choice: 'tflite'"),
    (["--format", "onnx", "-o", "/nonexistent-folder/x.onnx"], "expected an existing folder"),
    (["--format", "onnx", "--batch", "8:1", "-o", "x.onnx"], "--batch"),
    (["--format", "onnx", "--dtype", "bf16", "-o", "x.onnx"], "bf16"),
    (["--format", "onnx", "--cfg-folded", "-o", "x.onnx"], "unconditional"),
])
def test_export_bad_arguments_exit_2(tmp_path, monkeypatch, capsys, args, needle):
    """In-process (same code path as the console script; a subprocess per case would mostly time imports)."""
    from fastdiff.cli import main

    monkeypatch.chdir(tmp_path)
    if "-o" not in args:
        args = args + ["-o", str(tmp_path / "x.onnx")]
    try:
        code = main(["export", "arch:tiny-unet", "--no-progress", *args])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_export_takes_the_heads_the_weights_cannot_say(tmp_path):
    """The official DiT fixture was trained with 4 heads, which its weights do not say: --num-heads makes the
    exported graph match the official model's output."""
    import torch
    from safetensors.torch import load_file

    from fastdiff.runtime.onnxruntime_runner import OnnxRuntimeRunner

    fixtures = os.environ.get("FASTDIFF_FIXTURES", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                "fixtures"))
    ckpt = os.path.join(fixtures, "dit", "dit_tiny.pt")
    if not os.path.exists(ckpt):
        pytest.skip(f"reference fixture {ckpt} not present")
    out = tmp_path / "dit.onnx"
    r = fastdiff("export", ckpt, "--format", "onnx", "-o", str(out), "--num-heads", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    ref = load_file(os.path.join(fixtures, "dit", "reference.safetensors"))
    got = OnnxRuntimeRunner(str(out), device="cpu")(ref["x"], ref["t"].float(), class_labels=ref["y"])
    torch.testing.assert_close(got, ref["out"], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("extra,match", [(["--timing-cache", "c.bin"], "--timing-cache is for --format tensorrt"),
                                         (["--batch", "1:2:4"], "MIN:OPT:MAX ranges are for --format tensorrt")])
def test_onnx_export_refuses_tensorrt_only_options(tmp_path, extra, match):
    r = fastdiff("export", "arch:tiny-unet", "--format", "onnx", "-o", str(tmp_path / "u.onnx"), *extra, cwd=tmp_path)
    assert r.returncode == 2 and match in r.stderr and not (tmp_path / "u.onnx").exists()
