"""TensorRT: the static op check, profiles and engine staleness run anywhere; building and running an
engine needs tensorrt and a CUDA GPU and skips with the reason otherwise."""

import json
import os

import pytest
import torch

import fastdiff
from fastdiff.errors import BackendUnavailableError, BadArgumentError

onnx = pytest.importorskip("onnx")

from fastdiff.export.onnx import export_onnx  # noqa: E402
from fastdiff.export.tensorrt import (compare_sidecar, make_profiles, parse_range, require_tensorrt,  # noqa: E402
                                      tensorrt_available)
from fastdiff.export.trt_supported_ops import SUPPORTED_OPS, TRT_VERSION, static_check, unsupported_ops  # noqa: E402

try:
    import tensorrt  # noqa: F401
    HAS_TRT = True
except ImportError:
    HAS_TRT = False
needs_trt = pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()),
                               reason="tensorrt not installed" if not HAS_TRT else "needs a CUDA GPU")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """name -> ONNX path: the tiny architectures, opset 18 (the UNets with dynamic H/W, the SD one CFG-folded)."""
    d = tmp_path_factory.mktemp("trt")
    out = {}
    for name, kw in [("arch:tiny-unet", dict(dynamic_hw=True)), ("arch:tiny-sd-unet", dict(cfg_folded=True)),
                     ("arch:tiny-dit", dict(dtype="fp16")), ("arch:tiny-sd3", {}), ("arch:tiny-flux", {})]:
        path = str(d / (name.split(":")[1] + ".onnx"))
        export_onnx(fastdiff.load(name), None, path, opset=18, check=False, progress=False, **kw)
        out[name] = path
    return out


@pytest.mark.parametrize("name", ["arch:tiny-unet", "arch:tiny-sd-unet", "arch:tiny-dit", "arch:tiny-sd3",
                                  "arch:tiny-flux"])
def test_exported_graphs_use_only_tensorrt_ops(graphs, name):
    """(FLUX.1's rotary tables, float64 in PyTorch, are traced in float32: TensorRT has no DOUBLE.)"""
    assert TRT_VERSION.startswith("10")
    assert unsupported_ops(graphs[name]) == []
    assert static_check(graphs[name]) == []


def test_static_check_flags_what_tensorrt_refuses():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["a"], ["b"], to=TensorProto.DOUBLE),
             helper.make_node("StringNormalizer", ["b"], ["c"]),
             helper.make_node("MyPlugin", ["c"], ["d"], domain="com.example")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    assert unsupported_ops(model) == ["StringNormalizer", "com.example::MyPlugin"]
    problems = static_check(model)
    assert any("Cast to DOUBLE" in p for p in problems) and len(problems) == 3
    assert {"Conv", "InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax"} <= SUPPORTED_OPS


def test_parse_range():
    assert parse_range(4, "b") == (4, 4, 4)
    assert parse_range("1:4:8", "b") == (1, 4, 8)
    assert parse_range("2:8", "b") == (2, 8, 8)
    assert parse_range(None, "b") is None
    for bad in ("8:4:1", "0", "a:b", "1:2:3:4"):
        with pytest.raises(BadArgumentError):
            parse_range(bad, "--batch")


def test_profiles_from_the_graph(graphs):
    p = make_profiles(graphs["arch:tiny-sd-unet"], batch="1:2:4", sequence=77)
    assert p["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8))
    assert p["timestep"] == ((1,), (2,), (4,))
    assert p["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (4, 77, 32))
    assert p["guidance_scale"] == ((1,), (2,), (4,))
    hw = make_profiles(graphs["arch:tiny-unet"], batch=2, height="8:16:32", width="8:16:64")
    assert hw["sample"] == ((2, 3, 8, 8), (2, 3, 16, 16), (2, 3, 32, 64))
    with pytest.raises(BadArgumentError, match="dynamic"):
        make_profiles(graphs["arch:tiny-unet"], batch=2)  # dynamic H/W needs its range


def test_a_range_over_a_fixed_axis_is_refused(graphs, tmp_path):
    """A graph with a fixed height / width (or batch) cannot honour a MIN:OPT:MAX range over it: refused, instead of
    a profile silently fixed at the graph's size."""
    with pytest.raises(BadArgumentError, match="height: a MIN:OPT:MAX range .8:16:32. needs a dynamic height"):
        make_profiles(graphs["arch:tiny-sd-unet"], batch=2, height="8:16:32", width=8)
    static = str(tmp_path / "static.onnx")
    export_onnx(fastdiff.load("arch:tiny-dit"), None, static, dynamic_batch=False, batch=2, check=False,
                progress=False)
    with pytest.raises(BadArgumentError, match="batch: a MIN:OPT:MAX range .1:2:4. needs a dynamic batch"):
        make_profiles(static, batch="1:2:4")
    assert make_profiles(static)["sample"][0][0] == 2  # no batch asked for: the graph's own
    # the runners send one timestep per sample: the graph's batch of them fits its profile (review: it read 1:1:4)
    assert make_profiles(static)["timestep"] == ((1,), (2,), (2,))
    static8 = str(tmp_path / "static8.onnx")
    export_onnx(fastdiff.load("arch:tiny-dit"), None, static8, dynamic_batch=False, batch=8, cfg_folded=True,
                check=False, progress=False)
    assert {n: p[2] for n, p in make_profiles(static8).items() if n in ("timestep", "guidance_scale")} == {
        "timestep": (8,), "guidance_scale": (8,)}
    assert make_profiles(graphs["arch:tiny-sd-unet"], height=8, width=8)["sample"][2][0] == 4  # the default 1:1:4
    with pytest.raises(BadArgumentError, match="a text-length profile given .* found a graph with no text input"):
        make_profiles(static, sequence="1:16:32")


def test_text_sequence_profiles():
    from fastdiff.export.tensorrt import text_sequence

    assert text_sequence(fastdiff.load("arch:tiny-sd-unet").spec) == (1, 77, 308)
    assert text_sequence(fastdiff.load("arch:tiny-dit").spec) is None
    assert text_sequence(fastdiff.load("arch:tiny-sd3").spec) == (1, 333, 589)  # 77 CLIP + 256 to 512 T5 tokens
    assert text_sequence(fastdiff.load("arch:tiny-flux").spec) == (1, 512, 512)


def test_stale_engine_detection():
    env = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    side = dict(env, precision="fp16", onnx_sha256="abc", engine_sha256="eee",
                profiles={"sample": [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 8, 8]]})
    assert compare_sidecar(side, env, onnx_sha256="abc", engine_sha256="eee", precision="fp16") == (True, "up to date")
    fresh, why = compare_sidecar(side, dict(env, tensorrt="10.5.0", compute_capability="8.0", gpu="A100"))
    assert not fresh and "TensorRT: built for 10.3.0, this machine has 10.5.0" in why and "compute capability" in why
    fresh, why = compare_sidecar(side, env, onnx_sha256="xyz")
    assert not fresh and "source ONNX changed" in why
    fresh, why = compare_sidecar(side, env, engine_sha256="zzz")
    assert not fresh and "interrupted" in why
    fresh, why = compare_sidecar(side, env, precision="bf16")
    assert not fresh and "precision" in why
    assert compare_sidecar(None, env)[0] is False


@pytest.mark.skipif(HAS_TRT and torch.cuda.is_available(), reason="tensorrt is usable here")
def test_tensorrt_unavailable_is_a_clear_error(graphs, tmp_path):
    ok, why = tensorrt_available()
    assert not ok and why
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        require_tensorrt()
    from fastdiff.export.tensorrt import build_engine
    from fastdiff.runtime.tensorrt_runner import TensorRTRunner

    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        build_engine(graphs["arch:tiny-dit"], str(tmp_path / "x.engine"))
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        TensorRTRunner(str(tmp_path / "x.engine"))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# GPU + TensorRT
# --------------------------------------------------------------------------------------------------

@needs_trt
def test_build_run_and_rebuild(graphs, tmp_path):  # pragma: no cover - GPU machines
    from fastdiff.export.tensorrt import build_engine, engine_status
    from fastdiff.runtime.tensorrt_runner import TensorRTRunner

    src = graphs["arch:tiny-sd-unet"]
    engine = str(tmp_path / "sd.engine")
    cache = str(tmp_path / "timing.cache")
    res = build_engine(src, engine, batch="1:2:4", precision="fp16", timing_cache=cache, progress=False)
    assert res.built and os.path.isfile(engine) and os.path.isfile(cache)
    side = json.load(open(engine + ".json"))
    assert side["onnx_sha256"] and side["gpu"] and side["tensorrt"] == tensorrt.__version__
    assert engine_status(engine, src)[0]
    again = build_engine(src, engine, batch="1:2:4", precision="fp16", progress=False)
    assert not again.built  # up to date: reused

    pipe = fastdiff.load("arch:tiny-sd-unet", device="cuda")
    runner = TensorRTRunner(engine, onnx_path=src)
    x = torch.randn(2, 4, 8, 8, device="cuda")
    t = torch.tensor([500.0, 20.0], device="cuda")
    ctx, neg = torch.randn(2, 77, 32, device="cuda"), torch.randn(2, 77, 32, device="cuda")
    with torch.no_grad():
        c = pipe.model(x, t, encoder_hidden_states=ctx)
        u = pipe.model(x, t, encoder_hidden_states=neg)
    ref = u + 3.0 * (c - u)
    out = runner(x, t, encoder_hidden_states=ctx, uncond_encoder_hidden_states=neg, guidance_scale=3.0)
    torch.cuda.synchronize()
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 2e-2

    # CUDA graph capture of the runner
    gs = torch.tensor([3.0], device="cuda")
    runner(x, t, encoder_hidden_states=ctx, uncond_encoder_hidden_states=neg, guidance_scale=gs)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = runner(x, t, encoder_hidden_states=ctx, uncond_encoder_hidden_states=neg, guidance_scale=gs)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        c = pipe.model(x, t, encoder_hidden_states=ctx)
        u = pipe.model(x, t, encoder_hidden_states=neg)
    ref = u + 3.0 * (c - u)
    assert ((static_out - ref).abs().max() / ref.abs().max()).item() <= 2e-2

    # a changed ONNX makes the engine stale: refused by the runner, rebuilt by build_engine
    with open(src, "ab") as f:
        f.write(b"\0")
    assert not engine_status(engine, src)[0]
    with pytest.raises(BadArgumentError, match="source ONNX changed"):
        TensorRTRunner(engine, onnx_path=src)
    with pytest.raises(BadArgumentError, match="stale"):
        build_engine(src, engine, batch="1:2:4", precision="fp16", rebuild="never", progress=False)


def test_output_folders_are_checked_before_building(graphs, tmp_path):
    """A missing folder for the engine or the timing cache is refused before anything is built (the timing
    cache is written after the engine, so a failure there can never cost a finished build either)."""
    from fastdiff.export.tensorrt import build_engine

    for kw in (dict(engine_path=str(tmp_path / "no" / "x.engine")),
               dict(engine_path=str(tmp_path / "x.engine"), timing_cache=str(tmp_path / "no" / "cache.bin"))):
        with pytest.raises(BadArgumentError, match="expected an existing folder"):
            build_engine(graphs["arch:tiny-dit"], **kw)
    assert os.listdir(tmp_path) == []
