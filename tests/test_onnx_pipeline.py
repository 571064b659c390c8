"""ONNX artifacts as pipelines: fastdiff.load("model.onnx") and optimize(backend="onnxruntime") sample like eager."""

import pytest

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import rel_err

pytest.importorskip("onnxruntime", reason="the ONNX Runtime backend needs onnxruntime")
pytest.importorskip("onnx", reason="the exporter needs onnx")

KW = dict(seeds=[1, 2], class_labels=[3, 4], cfg_scale=2.0, steps=3, sampler="dpmpp_2m", progress=False)


def test_load_onnx_and_sample(tmp_path):
    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load("arch:tiny-dit")
    path = str(tmp_path / "dit.onnx")
    export_onnx(pipe, pipe.spec, path, progress=False)
    onnx_pipe = fastdiff.load(path)
    assert onnx_pipe.spec == pipe.spec
    assert rel_err(onnx_pipe.generate(**KW), pipe.generate(**KW)) <= 1e-5
    with pytest.raises(BadArgumentError, match="exported artifact"):
        onnx_pipe.save(str(tmp_path / "again"))


def test_optimize_onnxruntime_backend_equals_eager():
    eager = fastdiff.load("arch:tiny-dit")
    ort = fastdiff.load("arch:tiny-dit").optimize(backend="onnxruntime")
    assert type(ort.runner).__name__ == "OnnxRuntimeRunner"
    assert rel_err(ort.generate(**KW), eager.generate(**KW)) <= 1e-5


def test_a_graph_fixed_at_another_size_samples_at_that_size(tmp_path):
    """Exported at 32x32 with a fixed height / width: the stored spec says 32x32, so the loaded pipeline samples
    at the size the graph takes, and equals the PyTorch model there."""
    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load("arch:tiny-unet")
    path = str(tmp_path / "u32.onnx")
    export_onnx(pipe, pipe.spec, path, height=32, width=32, progress=False)
    onnx_pipe = fastdiff.load(path)
    assert tuple(onnx_pipe.spec.sample_size) == (32, 32)
    kw = dict(seeds=[1], steps=2, sampler="ddim", progress=False)
    assert rel_err(onnx_pipe.generate(**kw), pipe.generate(height=32, width=32, **kw)) <= 1e-5


def test_a_feed_the_graph_cannot_take_is_a_clear_error(tmp_path):
    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load("arch:tiny-unet")
    path = str(tmp_path / "b1.onnx")
    export_onnx(pipe, pipe.spec, path, dynamic_batch=False, progress=False)
    with pytest.raises(BadArgumentError, match="input 'sample': expected shape 1x3x16x16 .* found 2x3x16x16"):
        fastdiff.load(path).generate(seeds=[1, 2], steps=2, sampler="ddim", progress=False)
