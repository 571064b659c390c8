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
    (["--format", "onnx", "--cfg-folded", "-o", "x.onnx"], "(--cfg-folded) needs a conditional model"),
    (["--format", "onnx", "--fp16-io", "-o", "x.onnx"], "(--fp16-io) needs dtype='fp16' (--dtype fp16)"),
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


@pytest.mark.parametrize("extra,match", [
    (["--timing-cache", "c.bin"], "--timing-cache is for --format tensorrt"),
    (["--sequence", "1:77:154"], "--sequence is for --format tensorrt"),
    (["--batch", "1:2:4", "--static-batch"], "--batch 1:2:4: a range needs the dynamic batch axis"),
    (["--height", "8:16:32"], "--height: a MIN:OPT:MAX range needs dynamic height / width axes (--dynamic-hw)"),
    (["--width", "8:16:32", "--height", "16"], "--width: a MIN:OPT:MAX range needs dynamic"),
])
def test_onnx_export_refuses_options_it_cannot_honour(tmp_path, extra, match):
    r = fastdiff("export", "arch:tiny-unet", "--format", "onnx", "-o", str(tmp_path / "u.onnx"), *extra, cwd=tmp_path)
    assert r.returncode == 2 and match in r.stderr and not (tmp_path / "u.onnx").exists()


def test_onnx_export_takes_a_range_and_traces_at_its_opt(tmp_path):
    """MIN:OPT:MAX, as for a TensorRT profile: the ONNX graph is dynamic over it and is traced and checked at OPT."""
    out = tmp_path / "u.onnx"
    r = fastdiff("export", "arch:tiny-unet", "--format", "onnx", "-o", str(out), "--batch", "1:3:8", "--dynamic-hw",
                 "--height", "8:24:32", "--width", "16", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "batch 3, 24x16" in r.stdout
    from fastdiff.export.onnx import read_onnx_io

    assert read_onnx_io(str(out))["dynamic_batch"] and read_onnx_io(str(out))["dynamic_hw"]


def test_the_readme_export_example_runs(tmp_path):
    """The README's `fastdiff export` line, as written there, in an empty folder."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    lines = [ln.split("#")[0].split() for ln in readme.splitlines() if ln.startswith("fastdiff export ")]
    assert lines, "README.md has no `fastdiff export` example"
    for argv in lines:
        r = fastdiff(*argv[1:], "--no-progress", cwd=tmp_path)
        assert r.returncode == 0, (argv, r.stderr)
        assert (tmp_path / argv[argv.index("-o") + 1]).is_file()


@pytest.mark.parametrize("output", ["", "sub/", "existing"])
def test_an_output_that_is_no_file_path_is_one_line_of_error(tmp_path, output):
    (tmp_path / "sub").mkdir()
    (tmp_path / "existing").mkdir()
    r = fastdiff("export", "arch:tiny-unet", "--format", "onnx", "-o", output, "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("fastdiff export: error: cannot write"), r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "sub"]  # no temp folder left behind


def test_a_full_disk_is_one_line_of_error_and_keeps_the_previous_export(tmp_path, monkeypatch, capsys):
    """From a review: an OSError while writing (a full disk, a folder that refuses files) was a traceback."""
    import errno

    import onnx

    from fastdiff.cli import main

    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    code = main(["export", "arch:tiny-unet", "--format", "onnx", "--no-progress", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "failed: [Errno 28] No space left on device" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == ["m.onnx"] and out.read_bytes() == b"previous"


def test_exporting_an_exported_graph_is_refused_by_name(tmp_path):
    first = tmp_path / "u.onnx"
    assert fastdiff("export", "arch:tiny-unet", "--format", "onnx", "-o", str(first), "--no-progress").returncode == 0
    r = fastdiff("export", str(first), "--format", "onnx", "-o", str(tmp_path / "again.onnx"), "--no-progress")
    assert r.returncode == 2 and "expected a checkpoint with PyTorch weights, found a pipeline of an exported graph" \
        in r.stderr
    assert not (tmp_path / "again.onnx").exists()


def test_tensorrt_export_logic_with_a_stand_in_builder(tmp_path, monkeypatch):
    """The TensorRT path of `fastdiff export` without TensorRT (a stand-in builder and check): the profile gets the
    model's text length, the check runs at its OPT before the engine is placed, and a failing check leaves
    nothing at OUT."""
    import fastdiff.export.tensorrt as trt_mod
    from fastdiff.commands import export as cmd
    from fastdiff.errors import BadArgumentError

    calls = {}

    def build_engine(onnx_path, engine_path, **kw):
        calls["build"] = kw
        for path, text in ((engine_path, "engine"), (engine_path + trt_mod.SIDECAR_SUFFIX, "{}")):
            with open(path, "w") as f:
                f.write(text)
        return trt_mod.EngineResult(engine_path, 6, 0.1, True)

    def check(pipe, engine_path, io, batch, kw, tokens):
        calls["check"] = dict(placed=(tmp_path / "u.engine").exists(), tokens=tokens, batch=batch)
        if calls.get("fail"):
            raise BadArgumentError("stand-in check failed")
        return dict(max_abs_err=0.0, max_rel_err=0.0, check_note="stand-in")

    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_mod, "build_engine", build_engine)
    monkeypatch.setattr(cmd, "_check_engine", check)
    out = str(tmp_path / "u.engine")
    report = cmd.export_model("arch:tiny-sd-unet", out, format="tensorrt", batch="1:2:4", progress=False)
    assert calls["build"]["sequence"] == (1, 77, 308) and calls["build"]["batch"] == (1, 2, 4)
    assert calls["check"] == dict(placed=False, tokens=77, batch=2)
    assert report["path"] == out and open(out).read() == "engine" and os.path.exists(out + ".json")

    cmd.export_model("arch:tiny-sd-unet", out, format="tensorrt", sequence="1:16:32", progress=False)
    assert calls["build"]["sequence"] == (1, 16, 32) and calls["check"]["tokens"] == 16

    os.remove(out), os.remove(out + ".json")
    calls["fail"] = True
    with pytest.raises(BadArgumentError, match="stand-in check failed"):
        cmd.export_model("arch:tiny-sd-unet", out, format="tensorrt", progress=False)
    assert sorted(os.listdir(tmp_path)) == []  # no engine, no sidecar, no temp folder
