"""ONNX export of the native UNet / DiT and the ONNX Runtime runner, on the CPU.

Each tiny architecture is exported once per module (fixture) and reused; the exporter's own parity
check (ONNX Runtime CPU vs PyTorch float32) is asserted along with independent runs at other batches.
"""

import os

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError, FastdiffError, UnsupportedConfigError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fastdiff.export.onnx import export_onnx, read_onnx_io, read_onnx_spec  # noqa: E402
from fastdiff.runtime.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402

ARCHS = ("arch:tiny-unet", "arch:tiny-sd-unet", "arch:tiny-dit")
FP32_REL, FP16_REL = 1e-4, 5e-3


def rel(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def pipes():
    return {name: fastdiff.load(name) for name in ARCHS}


@pytest.fixture(scope="module")
def exported(pipes, tmp_path_factory):
    """name -> (ExportResult, OnnxRuntimeRunner): fp32, opset 17, dynamic batch, traced/checked at batch 2."""
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, pipe in pipes.items():
        res = export_onnx(pipe, None, str(d / (name.split(":")[1] + ".onnx")), batch=2, progress=False)
        out[name] = (res, OnnxRuntimeRunner(res.path, device="cpu", spinning=False))
    return out


def inputs(spec, b, seed=0, hw=None):
    g = torch.Generator().manual_seed(seed)
    h, w = hw or spec.sample_size
    x = torch.randn(b, spec.in_channels, h, w, generator=g)
    t = torch.linspace(900.5, 10.25, b)
    kw = {}
    if spec.cross_attention_dim:
        kw["encoder_hidden_states"] = torch.randn(b, 5, spec.cross_attention_dim, generator=g)
    if spec.num_classes:
        kw["class_labels"] = torch.randint(0, spec.num_classes, (b,), generator=g)
    return x, t, kw


# --------------------------------------------------------------------------------------------------
# fp32 parity, dynamic batch, metadata
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_export_parity_fp32(exported, name):
    res, _ = exported[name]
    assert os.path.getsize(res.path) == res.size_bytes > 0
    assert res.max_rel_err is not None and res.max_rel_err <= FP32_REL, res
    proto = onnx.load(res.path)
    names = [i.name for i in proto.graph.input]
    cond = {"arch:tiny-unet": [], "arch:tiny-sd-unet": ["encoder_hidden_states"], "arch:tiny-dit": ["class_labels"]}
    assert names == ["sample", "timestep"] + cond[name]
    assert [o.name for o in proto.graph.output] == ["out_sample"]
    assert {op.domain: op.version for op in proto.opset_import}[""] == 17


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("b", [1, 3])
def test_dynamic_batch_matches_pytorch(pipes, exported, name, b):
    pipe = pipes[name]
    _, runner = exported[name]
    x, t, kw = inputs(pipe.spec, b, seed=b)
    with torch.no_grad():
        ref = pipe.model(x, t, **kw)
    out = runner(x, t, **kw)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel(out, ref) <= FP32_REL


def test_runner_is_a_drop_in_callable(pipes, exported):
    """Scalar timesteps broadcast, a missing class label is the null class (as the native DiT)."""
    pipe = pipes["arch:tiny-dit"]
    _, runner = exported["arch:tiny-dit"]
    x, _, _ = inputs(pipe.spec, 2)
    with torch.no_grad():
        ref = pipe.model(x, 500)
    assert rel(runner(x, 500), ref) <= FP32_REL
    with pytest.raises(BadArgumentError, match="encoder_hidden_states"):
        runner(x, 500, encoder_hidden_states=torch.zeros(2, 3, 8))
    sd_runner = exported["arch:tiny-sd-unet"][1]
    with pytest.raises(BadArgumentError, match="text-conditioned"):
        sd_runner(torch.zeros(1, 4, 8, 8), 1)


def test_sampling_loop_through_onnxruntime_equals_eager(pipes, exported):
    """A few DDIM (eta=0) steps with the runner in place of the network give the eager samples."""
    pipe = pipes["arch:tiny-sd-unet"]
    _, runner = exported["arch:tiny-sd-unet"]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    x0, _, kw = inputs(pipe.spec, 2, seed=7)

    def ddim(net):
        x = x0.clone()
        ts = [999, 749, 499, 249]
        for i, t in enumerate(ts):
            with torch.no_grad():
                eps = net(x, torch.tensor([float(t)]), **kw).double()
            a, a_next = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64))
            pred_x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
            x = (a_next.sqrt() * pred_x0 + (1 - a_next).sqrt() * eps).float()
        return x

    assert rel(ddim(runner), ddim(pipe.model)) <= FP32_REL


@pytest.mark.parametrize("name", ARCHS)
def test_metadata_round_trip(pipes, exported, name):
    res, _ = exported[name]
    spec = read_onnx_spec(res.path)
    assert spec.to_dict() == pipes[name].spec.to_dict()
    meta = {p.key: p.value for p in onnx.load(res.path, load_external_data=False).metadata_props}
    assert meta["fastdiff.version"] == fastdiff.__version__
    assert meta["prediction_type"] == spec.prediction_type
    io = read_onnx_io(res.path)
    assert io["dtype"] == "fp32" and io["dynamic_batch"] and not io["cfg_folded"]


def test_read_onnx_spec_refuses_a_foreign_file(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["a"], ["b"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    p = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(p))
    with pytest.raises(BadArgumentError, match="exported by fastdiff"):
        read_onnx_spec(str(p))


# --------------------------------------------------------------------------------------------------
# Variants: fp16, opset 18, dynamic H/W, CFG-folded, external data
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,fp16_io", [("arch:tiny-dit", False), ("arch:tiny-sd-unet", True)])
def test_fp16_export(pipes, exported, tmp_path, name, fp16_io):
    """fp16 weights; ONNX Runtime CPU runs the fp16 graph (it upcasts ops it has no fp16 kernel for)."""
    pipe = pipes[name]
    res = export_onnx(pipe, None, str(tmp_path / "m16.onnx"), dtype="fp16", fp16_io=fp16_io, progress=False)
    assert res.max_rel_err is not None and res.max_rel_err <= FP16_REL, res
    assert pipe.dtype == torch.float32  # the caller's model is untouched
    runner = OnnxRuntimeRunner(res.path, device="cpu", spinning=False)
    assert runner.inputs["sample"] == (np.float16 if fp16_io else np.float32)
    x, t, kw = inputs(pipe.spec, 3, seed=3)
    with torch.no_grad():
        ref = pipe.model(x, t, **kw)
    out = runner(x, t, **kw)
    assert out.dtype == torch.float32
    assert rel(out, ref) <= FP16_REL
    assert res.size_bytes < 0.6 * exported[name][0].size_bytes  # fp16 weights


def test_fp16_export_keeps_float32_group_norm_statistics(pipes, tmp_path):
    """The half-precision graph normalises in float32 (what export/onnx.py promises): an fp16 variance can
    overflow in TensorRT / ONNX Runtime once activations pass ~256."""
    import onnx
    from onnx import TensorProto, shape_inference

    res = export_onnx(pipes["arch:tiny-sd-unet"], None, str(tmp_path / "m16.onnx"), dtype="fp16", progress=False)
    m = shape_inference.infer_shapes(onnx.load(res.path))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(m.graph.value_info) + list(m.graph.input)}
    norms = [n for n in m.graph.node if n.op_type in ("InstanceNormalization", "GroupNormalization")]
    assert norms
    assert {types.get(n.input[0]) for n in norms} == {TensorProto.FLOAT}


def test_opset18_export(pipes, tmp_path):
    """Opset 18 validates; GroupNorm is the InstanceNormalization form (GroupNormalization-18 is deprecated)."""
    pipe = pipes["arch:tiny-unet"]
    res = export_onnx(pipe, None, str(tmp_path / "o18.onnx"), opset=18, progress=False)
    proto = onnx.load(res.path)
    onnx.checker.check_model(proto, full_check=True)
    assert {op.domain: op.version for op in proto.opset_import}[""] == 18
    ops = {n.op_type for n in proto.graph.node}
    assert "InstanceNormalization" in ops and "GroupNormalization" not in ops
    assert res.max_rel_err <= FP32_REL


def test_dynamic_hw(pipes, tmp_path):
    pipe = pipes["arch:tiny-unet"]
    res = export_onnx(pipe, None, str(tmp_path / "hw.onnx"), dynamic_hw=True, progress=False)
    runner = OnnxRuntimeRunner(res.path, device="cpu", spinning=False)
    for hw in [(16, 16), (24, 32)]:
        x, t, kw = inputs(pipe.spec, 2, hw=hw)
        with torch.no_grad():
            ref = pipe.model(x, t, **kw)
        assert rel(runner(x, t, **kw), ref) <= FP32_REL


@pytest.mark.parametrize("name", ["arch:tiny-sd-unet", "arch:tiny-dit"])
def test_cfg_folded_equals_two_passes(pipes, tmp_path, name):
    pipe = pipes[name]
    spec = pipe.spec
    res = export_onnx(pipe, None, str(tmp_path / "cfg.onnx"), cfg_folded=True, progress=False)
    assert res.max_rel_err <= FP32_REL
    runner = OnnxRuntimeRunner(res.path, device="cpu", spinning=False)
    x, t, kw = inputs(spec, 3, seed=11)
    s = 4.5
    with torch.no_grad():
        if name == "arch:tiny-dit":
            c = pipe.model(x, t, class_labels=kw["class_labels"])
            u = pipe.model(x, t, class_labels=torch.full((3,), spec.null_class))
            out = runner(x, t, class_labels=kw["class_labels"], guidance_scale=s)
            g = spec.guided_channels  # official DiT: 3 of the 4 eps channels; variance passes through
            assert g == 3 and c.shape[1] == 8
        else:
            neg = torch.randn_like(kw["encoder_hidden_states"])
            c = pipe.model(x, t, encoder_hidden_states=kw["encoder_hidden_states"])
            u = pipe.model(x, t, encoder_hidden_states=neg)
            out = runner(x, t, encoder_hidden_states=kw["encoder_hidden_states"],
                         uncond_encoder_hidden_states=neg, guidance_scale=s)
            g = c.shape[1]
    expected = torch.cat([u[:, :g] + s * (c[:, :g] - u[:, :g]), c[:, g:]], dim=1)
    assert out.shape == expected.shape
    assert rel(out, expected) <= FP32_REL
    # per-sample guidance scales
    if name == "arch:tiny-dit":
        scales = torch.tensor([1.0, 2.0, 7.5])
        out2 = runner(x, t, class_labels=kw["class_labels"], guidance_scale=scales)
        exp2 = torch.cat([u[:, :g] + scales.view(-1, 1, 1, 1) * (c[:, :g] - u[:, :g]), c[:, g:]], dim=1)
        assert rel(out2, exp2) <= FP32_REL


def test_external_data(pipes, tmp_path):
    """Weights beside the graph (what a > 2 GB model gets); the path-based checker validates it."""
    pipe = pipes["arch:tiny-dit"]
    path = str(tmp_path / "ext.onnx")
    res = export_onnx(pipe, None, path, external_data=True, progress=False)
    assert res.files == [path, path + ".data"]
    assert os.path.getsize(path) < 100_000 < os.path.getsize(path + ".data")
    onnx.checker.check_model(path, full_check=True)
    assert res.max_rel_err <= FP32_REL
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]
    x, t, kw = inputs(pipe.spec, 1)
    with torch.no_grad():
        ref = pipe.model(x, t, **kw)
    assert rel(OnnxRuntimeRunner(path, device="cpu", spinning=False)(x, t, **kw), ref) <= FP32_REL


def test_from_pipeline(pipes):
    pipe = pipes["arch:tiny-dit"]
    runner = OnnxRuntimeRunner.from_pipeline(pipe, device="cpu")
    folder = runner._tmpdir.name
    x, t, kw = inputs(pipe.spec, 2)
    with torch.no_grad():
        ref = pipe.model(x, t, **kw)
    assert rel(runner(x, t, **kw), ref) <= FP32_REL
    runner.close()
    assert not os.path.exists(folder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_io_binding(exported, pipes):  # pragma: no cover - GPU machines
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu not installed")
    res, _ = exported["arch:tiny-sd-unet"]
    pipe = pipes["arch:tiny-sd-unet"]
    runner = OnnxRuntimeRunner(res.path)  # a GPU is there: CUDA provider by default
    assert runner.device.type == "cuda"
    x, t, kw = inputs(pipe.spec, 2)
    with torch.no_grad():
        ref = pipe.model(x, t, **kw)
    out = runner(x.cuda(), t.cuda(), **{k: v.cuda() for k, v in kw.items()})
    assert out.device.type == "cuda"
    assert rel(out.cpu(), ref) <= 1e-3


# --------------------------------------------------------------------------------------------------
# Atomic writes and bad input
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["onnx.checker.check_model", "onnx.save_model"])
def test_interrupted_export_leaves_no_file(pipes, tmp_path, monkeypatch, where):
    mod, attr = where.rsplit(".", 1)

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(eval(mod), attr, boom)
    path = tmp_path / "model.onnx"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(pipes["arch:tiny-dit"], None, str(path), progress=False)
    assert os.listdir(tmp_path) == []  # no file at the path, no temp leftovers


def test_interrupted_export_keeps_the_previous_file(pipes, tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")

    def boom(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(onnx.checker, "check_model", boom)
    with pytest.raises(RuntimeError):
        export_onnx(pipes["arch:tiny-dit"], None, str(path), progress=False)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["model.onnx"]


@pytest.mark.parametrize("interrupted_at", [1, 2, 3, 4])
def test_an_interrupted_overwrite_keeps_the_previous_export(pipes, tmp_path, monkeypatch, interrupted_at):
    """Overwriting an external-data export takes four renames (the previous graph and data aside, the new data and
    graph in): interrupted at any of them, the previous graph and weights are back, byte for byte (a review: at the
    last one the previous graph was lost with the staging folder and its weights overwritten)."""
    path = str(tmp_path / "ext.onnx")
    export_onnx(pipes["arch:tiny-dit"], None, path, external_data=True, check=False, progress=False)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    real_replace, seen = os.replace, []

    def replace(src, dst):
        if path in (os.fspath(src), os.fspath(dst)) or path + ".data" in (os.fspath(src), os.fspath(dst)):
            seen.append((src, dst))
            if len(seen) == interrupted_at:
                raise KeyboardInterrupt("simulated interruption")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(pipes["arch:tiny-unet"], None, path, external_data=True, check=False, progress=False)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_a_first_external_data_export_interrupted_leaves_nothing(pipes, tmp_path, monkeypatch):
    """With no previous export, an interruption between the data's rename and the graph's leaves no lone weights."""
    path = str(tmp_path / "ext.onnx")
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == path:
            raise KeyboardInterrupt("simulated interruption")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(pipes["arch:tiny-dit"], None, path, external_data=True, check=False, progress=False)
    assert os.listdir(tmp_path) == []


def test_overwriting_an_external_data_export_named_previous_onnx(pipes, tmp_path):
    """The previous graph is set aside in a folder of its own: at a path named previous.onnx it overwrote the new
    graph staged beside it, and the old graph stayed with the new weights. Both files get the usual permissions
    (onnx writes the weights owner-only)."""
    from fastdiff.export.onnx import read_onnx_io

    path = str(tmp_path / "previous.onnx")
    export_onnx(pipes["arch:tiny-sd-unet"], None, path, external_data=True, check=False, progress=False)
    res = export_onnx(pipes["arch:tiny-sd-unet"], None, path, external_data=True, cfg_folded=True, progress=False)
    assert res.io["cfg_folded"] and read_onnx_io(path)["cfg_folded"]  # the new graph is the one on disk
    assert sorted(os.listdir(tmp_path)) == ["previous.onnx", "previous.onnx.data"]
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(tmp_path):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~mask, name


def test_bad_input(pipes, tmp_path):
    pipe = pipes["arch:tiny-unet"]
    with pytest.raises(BadArgumentError, match="ModelSpec"):
        export_onnx(torch.nn.Linear(2, 2), None, str(tmp_path / "a.onnx"), progress=False)
    with pytest.raises(BadArgumentError, match="expected an existing folder"):
        export_onnx(pipe, None, str(tmp_path / "missing" / "a.onnx"), progress=False)
    with pytest.raises(BadArgumentError, match="opset"):
        export_onnx(pipe, None, str(tmp_path / "a.onnx"), opset=11, progress=False)
    with pytest.raises(BadArgumentError, match="dtype"):
        export_onnx(pipe, None, str(tmp_path / "a.onnx"), dtype="int8", progress=False)
    with pytest.raises(BadArgumentError, match="unconditional"):
        export_onnx(pipe, None, str(tmp_path / "a.onnx"), cfg_folded=True, progress=False)
    with pytest.raises(BadArgumentError, match="DiT"):
        export_onnx(pipes["arch:tiny-dit"], None, str(tmp_path / "a.onnx"), dynamic_hw=True, progress=False)
    with pytest.raises(BadArgumentError, match="folder"):
        export_onnx(pipe, None, str(tmp_path), progress=False)
    # a module with a spec that does not fit it: the trace fails and says so
    with pytest.raises(UnsupportedConfigError, match="torch.onnx.export failed"):
        export_onnx(torch.nn.Linear(2, 2), pipe.spec, str(tmp_path / "a.onnx"), progress=False)
    for name, value in (("batch", True), ("batch", 0), ("height", 0), ("height", -4), ("width", 3.7)):
        with pytest.raises(BadArgumentError, match=f"{name} must be a positive int"):
            export_onnx(pipe, None, str(tmp_path / "a.onnx"), progress=False, **{name: value})
    assert os.listdir(tmp_path) == []
    with pytest.raises(BadArgumentError, match="no such ONNX file"):
        OnnxRuntimeRunner(str(tmp_path / "nope.onnx"), device="cpu")
    assert issubclass(BadArgumentError, FastdiffError)


def test_export_leaves_the_callers_model_in_its_mode(pipes, tmp_path):
    """The export traces in eval mode; a model the caller had in training mode stays so (a review: it came back in
    eval mode)."""
    model = pipes["arch:tiny-dit"].model
    model.train()
    try:
        export_onnx(pipes["arch:tiny-dit"], None, str(tmp_path / "a.onnx"), check=False, progress=False)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    export_onnx(pipes["arch:tiny-dit"], None, str(tmp_path / "b.onnx"), check=False, progress=False)
    assert not any(m.training for m in model.modules())


def test_damaged_bytes_and_metadata_are_corrupt_checkpoints(exported, tmp_path):
    """Bytes that are no ONNX model, and fastdiff metadata that does not parse, are CorruptCheckpointErrors (they were
    protobuf's DecodeError and json's JSONDecodeError)."""
    import onnx

    from fastdiff.errors import CorruptCheckpointError

    for content in (b"", b"\x00\xffnot an onnx file at all" * 4):
        with pytest.raises(CorruptCheckpointError, match=f"found {len(content)} bytes in memory"):
            read_onnx_spec(content)
        with pytest.raises(CorruptCheckpointError, match="in memory"):
            OnnxRuntimeRunner(content, device="cpu")
    for key, text in (("fastdiff.spec", "{not json"), ("fastdiff.io", "[1, 2"), ("fastdiff.spec", '{"kind": 3, '
                                                                                                    '"bogus": 1}')):
        proto = onnx.load(exported["arch:tiny-dit"][0].path)
        next(p for p in proto.metadata_props if p.key == key).value = text
        path = str(tmp_path / "damaged.onnx")
        onnx.save_model(proto, path)
        with pytest.raises(FastdiffError, match=f"ONNX metadata '{key}'|bogus"):
            read_onnx_spec(path) if key == "fastdiff.spec" else read_onnx_io(path)
        with pytest.raises(FastdiffError):
            fastdiff.load(path)


def test_unwritable_folder(pipes, tmp_path, monkeypatch):
    """A read-only folder is refused before any work. Root may write anywhere, so the check that the
    exporter relies on (os.access) is made to answer as it would for a read-only folder."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if os.path.abspath(p) == str(d) and
                        mode & os.W_OK else real_access(p, mode, *a, **k))
    with pytest.raises(BadArgumentError, match="not writable"):
        export_onnx(pipes["arch:tiny-unet"], None, str(d / "a.onnx"), progress=False)
    assert os.listdir(d) == []


@pytest.mark.parametrize("name,switch", [("arch:tiny-sd-unet", "fuse_conditioning"), ("arch:tiny-dit", "fuse_adaln")])
def test_an_optimized_model_exports_its_per_layer_projections(pipes, exported, tmp_path, name, switch):
    """A model whose projections were stacked by an earlier optimize exports the checkpoint's graph: the same
    weights, no stacked copy among them, the same outputs."""
    pipe = fastdiff.load(name)
    pipe.model.load_state_dict(pipes[name].model.state_dict())
    pipe.optimize(**{switch: True})
    assert any(getattr(pipe.model, f"{n}_weight", None) is not None for n in pipe.model.STACKS)
    res = export_onnx(pipe, None, str(tmp_path / "stacked.onnx"), batch=2, progress=False)
    plain = onnx.load(exported[name][0].path)
    stacked = onnx.load(res.path)
    size = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer)  # noqa: E731
    assert size(stacked) == size(plain)
    x, t, kw = inputs(pipe.spec, 2)
    got = OnnxRuntimeRunner(res.path, device="cpu", spinning=False)(x, t, **kw)
    assert rel(got, exported[name][1](x, t, **kw)) <= 1e-5


def test_a_graph_with_non_finite_outputs_is_refused(pipes, tmp_path):
    """fp16 activations that overflow (weights scaled up here): the parity check refuses the graph, nothing is
    written, instead of reporting "max abs error nan"."""
    import copy

    pipe = copy.deepcopy(pipes["arch:tiny-unet"])
    with torch.no_grad():
        for p in pipe.model.parameters():
            p.mul_(300.0)
    out = tmp_path / "inf.onnx"
    with pytest.raises(BadArgumentError, match="non-finite outputs .fp16"):
        export_onnx(pipe, None, str(out), dtype="fp16", progress=False)
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("kw,dims", [(dict(cfg_folded=True), ["batch", 4, 8, 8]),
                                     (dict(cfg_folded=True, dynamic_hw=True), ["batch", 4, "height", "width"]),
                                     (dict(height=16, width=24), ["batch", 4, 16, 24])])
def test_the_output_declares_its_fixed_sizes(pipes, tmp_path, kw, dims):
    """Channels (and height / width unless dynamic) are numbers in the graph's output type, not symbols a consumer
    would take for dynamic axes."""
    path = str(tmp_path / "o.onnx")
    export_onnx(pipes["arch:tiny-sd-unet"], None, path, progress=False, **kw)
    out = onnx.load(path).graph.output[0]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == dims


def test_runner_refuses_per_sample_inputs_of_the_wrong_count(exported):
    _, runner = exported["arch:tiny-dit"]
    x = torch.randn(3, 4, 8, 8)
    for kw, name in ((dict(timestep=torch.tensor([10.0, 20.0]), class_labels=[1, 2, 3]), "timestep"),
                     (dict(timestep=10.0, class_labels=[1, 2]), "class_labels")):
        with pytest.raises(BadArgumentError, match=f"{name}: expected one value or one per sample .3., found .2,."):
            runner(x, **kw)
    assert runner(x, 10.0, class_labels=[5]).shape[0] == 3  # one label for every sample


@pytest.mark.parametrize("content", [b"", b"\x00\xffnot an onnx file at all" * 4], ids=["empty", "garbage"])
def test_a_damaged_onnx_file_is_a_corrupt_checkpoint(tmp_path, content):
    from fastdiff.errors import CorruptCheckpointError

    p = tmp_path / "model.onnx"
    p.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=f"expected an ONNX model, found {len(content)} bytes"):
        fastdiff.load(str(p))


def test_replacing_an_external_data_export_with_a_plain_one_never_strands_the_graph(pipes, tmp_path, monkeypatch):
    """The stale weights file goes only after the new self-contained graph is in place: interrupted in between, the
    folder still holds a graph that loads. A graph whose weights file is gone is a corrupt checkpoint, by name."""
    path = str(tmp_path / "m.onnx")
    export_onnx(pipes["arch:tiny-dit"], None, path, external_data=True, check=False, progress=False)

    def interrupted(p):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(os, "remove", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(pipes["arch:tiny-dit"], None, path, external_data=False, check=False, progress=False)
    monkeypatch.undo()
    OnnxRuntimeRunner(path, device="cpu")  # the new graph, self-contained, opens
    export_onnx(pipes["arch:tiny-dit"], None, path, external_data=True, check=False, progress=False)
    os.remove(path + ".data")
    from fastdiff.errors import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError, match="external data file beside it"):
        OnnxRuntimeRunner(path, device="cpu")
    with open(path, "rb") as f:
        graph = f.read()
    with pytest.raises(CorruptCheckpointError, match=f"an ONNX graph of {len(graph)} bytes in memory: .* opens from "
                                                     f"its path") as e:
        OnnxRuntimeRunner(graph, device="cpu")
    assert len(str(e.value)) < 600  # the graph's bytes are not in the message


def test_export_review_fixes(tmp_path):
    """A learned timestep table of 100 rows traces with timesteps inside it; a text UNet with a class embedding and
    a bf16 onnxruntime backend are refused by name."""
    import diffusers

    from helpers import rel_err

    diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1,
                          down_block_types=["DownBlock2D", "AttnDownBlock2D"], norm_num_groups=8,
                          up_block_types=["AttnUpBlock2D", "UpBlock2D"], time_embedding_type="learned",
                          num_train_timesteps=100).save_pretrained(tmp_path / "learned" / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "learned" / "scheduler")
    pipe = fastdiff.load(str(tmp_path / "learned"))
    res = export_onnx(pipe, None, str(tmp_path / "learned.onnx"), progress=False)
    assert res.max_rel_err < 1e-5
    ort = fastdiff.load(str(tmp_path / "learned")).optimize(backend="onnxruntime")
    kw = dict(seeds=[1, 2], steps=4, sampler="ddim", progress=False)
    assert rel_err(ort.generate(**kw), pipe.generate(**kw)) <= 1e-5

    diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32],
                                   layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=8,
                                   attention_head_dim=4, norm_num_groups=8,
                                   class_embed_type="timestep").save_pretrained(tmp_path / "cet")
    with pytest.raises(UnsupportedConfigError, match="class_embed_type"):
        export_onnx(fastdiff.load(str(tmp_path / "cet")), None, str(tmp_path / "cet.onnx"), progress=False)
    with pytest.raises(BadArgumentError, match="backend 'onnxruntime': dtype 'bf16'"):
        fastdiff.load("arch:tiny-dit").optimize(backend="onnxruntime", dtype="bf16")
