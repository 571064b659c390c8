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
