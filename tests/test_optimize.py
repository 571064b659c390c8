"""pipe.optimize: the OptimizeConfig switches, each checked against eager sampling."""

import importlib.util
import warnings

import pytest
import torch

import fastdiff
from fastdiff.errors import BackendUnavailableError, BadArgumentError
from fastdiff.runtime.config import OptimizeConfig
from helpers import rel_err

KW = dict(seeds=[4, 5], steps=3, sampler="dpmpp_2m", encoder_hidden_states=torch.randn(1, 6, 32),
          negative_encoder_hidden_states=torch.zeros(1, 6, 32), cfg_scale=4.0, progress=False)


@pytest.fixture(scope="module")
def reference():
    return fastdiff.load("arch:tiny-sd-unet").generate(**KW)


@pytest.mark.parametrize("switches,tol", [
    (dict(fuse_qkv=True), 1e-5),
    (dict(channels_last=True), 1e-5),
    (dict(dtype="bf16"), 5e-2),
    (dict(fuse_qkv=True, channels_last=True, dtype="fp16"), 5e-2),
])
def test_switches_keep_samples(reference, switches, tol):
    pipe = fastdiff.load("arch:tiny-sd-unet").optimize(**switches)
    out = pipe.generate(**KW)
    assert out.dtype == torch.float32  # sampler state stays float32 whatever the network dtype
    assert rel_err(out, reference) <= tol
    if switches.get("dtype"):
        assert pipe.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[switches["dtype"]]


def test_fuse_qkv_is_not_saved(tmp_path):
    pipe = fastdiff.load("arch:tiny-sd-unet").optimize(fuse_qkv=True)
    pipe.save(str(tmp_path / "m"))
    assert fastdiff.load(str(tmp_path / "m")).model.state_dict().keys() == \
        fastdiff.load("arch:tiny-sd-unet").model.state_dict().keys()


def test_fuse_adaln_keeps_samples_and_saves_the_original_layout(tmp_path):
    """DiT with every adaLN projection in one matmul: the same samples; ``save`` writes the per-block weights
    (views of the fused buffer, which safetensors would refuse unseparated) and they load back equal."""
    kw = dict(seeds=[1, 2], steps=3, sampler="dpmpp_2m", class_labels=[0, 1], cfg_scale=3.0, progress=False)
    reference = fastdiff.load("arch:tiny-dit").generate(**kw)
    pipe = fastdiff.load("arch:tiny-dit").optimize(fuse_adaln=True)
    assert pipe.model.adaln_weight is not None
    assert rel_err(pipe.generate(**kw), reference) <= 1e-6
    pipe.save(str(tmp_path / "m"))
    loaded = fastdiff.load(str(tmp_path / "m"))
    assert loaded.model.adaln_weight is None
    for k, v in pipe.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)
    assert rel_err(loaded.generate(**kw), reference) <= 1e-6


@pytest.mark.parametrize("arch,switch,buffer", [("arch:tiny-dit", "fuse_adaln", "adaln_weight"),
                                                 ("arch:tiny-sd-unet", "fuse_qkv", "qkv_weight")])
def test_a_later_optimize_without_the_fusion_undoes_it(arch, switch, buffer):
    pipe = fastdiff.load(arch).optimize(**{switch: True})
    fused = [m for m in pipe.model.modules() if getattr(m, buffer, None) is not None]
    assert fused
    pipe.optimize()
    assert all(getattr(m, buffer) is None for m in fused)


@pytest.mark.parametrize("arch,device,fused", [("arch:tiny-dit", "cuda", True), ("arch:tiny-dit", "cpu", False),
                                                 ("arch:tiny-sd-unet", "cuda", False)])
def test_fuse_adaln_defaults_on_for_a_dit_on_cuda_only(arch, device, fused):
    """fuse_adaln=None (the default) stacks a DiT's adaLN projections where that measured faster (CUDA),
    leaves other devices and models alone, and never leaves a note for a model it does not apply to."""
    from fastdiff.runtime.runners import prepare_model

    model, notes = fastdiff.load(arch).model, []
    prepare_model(model, OptimizeConfig(), torch.device(device), notes)  # decides only; nothing moves
    assert (getattr(model, "adaln_weight", None) is not None) == fused and notes == []
    prepare_model(model, OptimizeConfig(fuse_adaln=False), torch.device(device), notes)
    assert getattr(model, "adaln_weight", None) is None


@pytest.mark.parametrize("arch,device,fused", [("arch:tiny-sd-unet", "cuda", True), ("arch:tiny-sd-unet", "cpu", False),
                                                 ("arch:tiny-dit", "cuda", False)])
def test_fuse_qkv_defaults_on_for_self_attention_on_cuda_only(arch, device, fused):
    """fuse_qkv=None (the default) stacks self-attention's q, k, v on CUDA, where it measured faster, as views:
    no second copy of the weights. The DiT (qkv already one layer) and other devices are left alone, silently."""
    from fastdiff.models.unet import MultiHeadAttention
    from fastdiff.runtime.runners import prepare_model

    model, notes = fastdiff.load(arch).model, []
    prepare_model(model, OptimizeConfig(), torch.device(device), notes)
    stacked = [m for m in model.modules() if getattr(m, "qkv_weight", None) is not None]
    assert bool(stacked) == fused and notes == []
    for m in stacked:
        assert not m.is_cross
        ptr = m.qkv_weight.untyped_storage().data_ptr()
        assert all(lin.weight.untyped_storage().data_ptr() == ptr for lin in (m.to_q, m.to_k, m.to_v))
    selfs = [m for m in model.modules() if isinstance(m, MultiHeadAttention) and not m.is_cross]
    assert len(stacked) == (len(selfs) if fused else 0)
    prepare_model(model, OptimizeConfig(fuse_qkv=False), torch.device(device), notes)
    assert all(getattr(m, "qkv_weight", None) is None for m in model.modules())


@pytest.mark.parametrize("arch,device,fused", [("arch:tiny-sd-unet", "cuda", True), ("arch:tiny-sd-unet", "cpu", False),
                                                 ("arch:tiny-dit", "cuda", False)])
def test_fuse_conditioning_defaults_on_for_a_unet_on_cuda_only(arch, device, fused):
    """fuse_conditioning=None (the default) stacks a UNet's time and cross-attention key / value projections on
    CUDA, where it measured 3.1% faster (SD1.5, run 4); other devices and models are left alone, silently."""
    from fastdiff.runtime.runners import prepare_model

    model, notes = fastdiff.load(arch).model, []
    prepare_model(model, OptimizeConfig(), torch.device(device), notes)
    stacks = [getattr(model, f"{name}_weight", None) for name in ("temb", "cross_kv")]
    assert all((w is not None) == fused for w in stacks) and notes == []
    prepare_model(model, OptimizeConfig(fuse_conditioning=False), torch.device(device), notes)
    assert all(getattr(model, f"{name}_weight", None) is None for name in ("temb", "cross_kv"))


def test_a_channels_last_unet_makes_no_nchw_copy():
    """A channels-last UNet's attention blocks hand their tokens to proj_out as the channels-last image they
    already are: no NCHW copy per block (16 per SD1.5 call before), and the same output as the NCHW model."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy) \
                    and isinstance(out, torch.Tensor) and out.dim() == 4:
                self.found.append(tuple(out.shape))
            return out

    model = fastdiff.load("arch:tiny-sd-unet").model
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32)
    with torch.no_grad():
        want = model(x, torch.tensor([10.0, 500.0]), encoder_hidden_states=ctx)
        model.to(memory_format=torch.channels_last)
        x, t = x.contiguous(memory_format=torch.channels_last), torch.tensor([10.0, 500.0])
        with Copies():
            got = model(x, t, encoder_hidden_states=ctx)
    assert Copies.found == [] and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("arch,switches,note", [
    ("arch:tiny-sd-unet", dict(fuse_adaln=True), "fuse_adaln ignored"),  # no adaLN
    ("arch:tiny-dit", dict(fuse_qkv=True), "fuse_qkv ignored"),  # DiT stores qkv fused already
    ("arch:tiny-dit", dict(fuse_adaln=True, backend="onnxruntime"), "fuse_adaln ignored: the onnxruntime"),
    ("arch:tiny-dit", dict(cudnn_benchmark=True, backend="onnxruntime"), "cudnn_benchmark ignored: the onnxruntime"),
])
def test_a_fusion_with_nothing_to_fuse_says_so(arch, switches, note):
    if switches.get("backend") == "onnxruntime":
        pytest.importorskip("onnxruntime")
    pipe = fastdiff.load(arch).optimize(**switches)
    assert any(n.startswith(note) for n in pipe.notes), pipe.notes


@pytest.mark.parametrize("kwargs", [dict(backend="nope"), dict(dtype="fp8"), dict(graph_scope="all"),
                                    dict(batch_buckets=()), dict(batch_buckets=(0, 2)), dict(max_graphs=0),
                                    dict(backend="compile", compile_mode="fast"),
                                    dict(backend="triton", compile_mode="max-autotune")])
def test_config_validation(kwargs):
    with pytest.raises(BadArgumentError):
        OptimizeConfig(**kwargs)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(batch_buckets=4), "tuple or list"),          # was a TypeError (an int is not iterable)
    (dict(batch_buckets="124"), "tuple or list"),
    (dict(batch_buckets=(1.7, 3)), "1.7"),             # was silently truncated to 1
    (dict(batch_buckets=(True, 2)), "True"),
    (dict(batch_buckets=(1, 1, 2)), "distinct"),       # was accepted
    (dict(max_graphs="3"), "'3'"),                     # was a TypeError ('<' between str and int)
    (dict(max_graphs=2.5), "2.5"),
    (dict(cuda_graphs="no"), "'no'"),                  # a truthy string turned graphs on
    (dict(channels_last=1), "channels_last"),
    (dict(fuse_qkv="yes"), "fuse_qkv"),
    (dict(cudnn_benchmark="on"), "cudnn_benchmark"),
])
def test_config_validation_says_what_it_found(kwargs, needle):
    """Wrong types are a BadArgumentError naming the field and the value found, never a raw TypeError or a
    silent conversion."""
    with pytest.raises(BadArgumentError) as e:
        OptimizeConfig(**kwargs)
    assert needle in str(e.value) and next(iter(kwargs)) in str(e.value)


@pytest.mark.parametrize("mode,graphs,device,expected", [
    ("max-autotune", True, "cuda", "max-autotune-no-cudagraphs"),
    ("reduce-overhead", True, "cuda", "default"),
    ("max-autotune", False, "cuda", "max-autotune"),  # no fastdiff graphs: Inductor keeps its own
    ("max-autotune", True, "cpu", "max-autotune"),  # no CUDA graphs on the CPU at all
    ("max-autotune-no-cudagraphs", True, "cuda", "max-autotune-no-cudagraphs"),
])
def test_compile_mode_leaves_graphs_to_fastdiff(mode, graphs, device, expected):
    """Inductor's CUDA graphs never nest inside fastdiff's capture; the note says what ran instead."""
    from fastdiff.runtime.runners import compile_mode

    notes = []
    config = OptimizeConfig(backend="compile", compile_mode=mode, cuda_graphs=graphs)
    assert compile_mode(config, torch.device(device), notes) == expected
    assert bool(notes) == (expected != mode)


def test_buckets_are_sorted():
    assert OptimizeConfig(batch_buckets=(8, 1, 4)).batch_buckets == (1, 4, 8)
    assert OptimizeConfig(batch_buckets=[2, 1]).batch_buckets == (1, 2)  # a list of ints (fastdiff bench's) too


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_requested_without_tensorrt_fails_loudly():
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        fastdiff.load("arch:tiny-unet").optimize(backend="tensorrt")


def test_compile_backend_equals_eager():
    """torch.compile(fullgraph=True, dynamic=False) compiles the whole DiT (no graph breaks) on the CPU."""
    kw = dict(seeds=[1, 2], class_labels=[3, 4], cfg_scale=2.0, steps=2, sampler="dpmpp_2m", progress=False)
    eager = fastdiff.load("arch:tiny-dit").generate(**kw)
    compiled = fastdiff.load("arch:tiny-dit").optimize(backend="compile")
    assert rel_err(compiled.generate(**kw), eager) <= 1e-5


def test_compile_backend_takes_more_static_shapes_than_dynamos_default_limit():
    """backend="compile" compiles once per static shape (network bucket x resolution x conditioning). Here nine:
    buckets (1, 2) make network batches 1, 2, 4, at three resolutions. Dynamo's default recompile limit is 8, and
    under fullgraph=True the ninth shape used to fail hard (FailOnRecompileLimitHit). About 12 s on a CPU."""
    eager = fastdiff.load("arch:tiny-unet")
    pipe = fastdiff.load("arch:tiny-unet").optimize(backend="compile", batch_buckets=(1, 2))
    for h, w in ((8, 8), (8, 16), (16, 8)):
        for b in (1, 2, 3):
            kw = dict(seeds=list(range(b)), steps=1, sampler="euler", height=h, width=w, progress=False)
            out = pipe.generate(**kw)
    assert rel_err(out, eager.generate(**kw)) <= 1e-5


def test_compile_without_a_per_model_limit_raises_dynamos_own(monkeypatch):
    """On a torch whose torch.compile takes no ``recompile_limit`` (2.5 and the versions after it), the
    process-wide limits are raised to the shapes fastdiff can produce, never lowered."""
    from torch._dynamo import config as dynamo

    from fastdiff.runtime.runners import SIGNATURES_PER_BUCKET

    def older_compile(model, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None,
                      disable=False):
        assert fullgraph and dynamic is False
        return model

    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    total = "accumulated_recompile_limit" if hasattr(dynamo, "accumulated_recompile_limit") else \
        "accumulated_cache_size_limit"
    monkeypatch.setattr(torch, "compile", older_compile)
    # Dynamo's config through its own patch(), not monkeypatch: pytest >= 9.2 undoes a module attribute that is not
    # in the module's __dict__ with delattr, which hides a torch config entry for the rest of the process
    with dynamo.patch({limit: 8, total: 10_000}):
        fastdiff.load("arch:tiny-unet").optimize(backend="compile", batch_buckets=(1, 2, 4, 8, 16))
        assert getattr(dynamo, limit) == SIGNATURES_PER_BUCKET * 6  # network batches 1, 2, 4, 8, 16, 32
        assert getattr(dynamo, total) == 10_000  # already above: left alone
    assert hasattr(dynamo, limit) and hasattr(dynamo, total)


def test_compile_with_a_per_model_limit_isolates_it(monkeypatch):
    """Where torch.compile takes ``recompile_limit`` and ``isolate_recompiles`` (torch 2.13), both are passed: without
    isolation two models of one class share one count, and the second fails after the first one's shapes."""
    from fastdiff.runtime.runners import SIGNATURES_PER_BUCKET

    calls = []

    def newer_compile(model, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None,
                      disable=False, recompile_limit=None, isolate_recompiles=False):
        calls.append(dict(recompile_limit=recompile_limit, isolate_recompiles=isolate_recompiles))
        return model

    monkeypatch.setattr(torch, "compile", newer_compile)
    for _ in range(2):
        fastdiff.load("arch:tiny-unet").optimize(backend="compile", batch_buckets=(1, 2))
    assert calls == [dict(recompile_limit=SIGNATURES_PER_BUCKET * 3, isolate_recompiles=True)] * 2


def test_sdpa_backend_pinning():
    """sdpa_backend pins torch's SDPA in every native attention core; a backend that cannot run says so."""
    from fastdiff.errors import BackendUnavailableError
    from fastdiff.models.layers import Attention

    kw = dict(seeds=[1, 2], class_labels=[1, 2], steps=2, sampler="ddim", cfg_scale=2.0, progress=False)
    want = fastdiff.load("arch:tiny-dit").generate(**kw)
    pinned = fastdiff.load("arch:tiny-dit").optimize(sdpa_backend="math")
    assert {m.sdpa_backend for m in pinned.model.modules() if isinstance(m, Attention)} == {"math"}
    torch.testing.assert_close(pinned.generate(**kw), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(BackendUnavailableError, match="cudnn"):  # cuDNN attention needs a CUDA device
        fastdiff.load("arch:tiny-dit").optimize(sdpa_backend="cudnn").generate(**kw)
    with pytest.raises(fastdiff.BadArgumentError, match="sdpa_backend"):
        OptimizeConfig(sdpa_backend="xformers")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_cudnn_benchmark_is_on_while_the_network_runs_only(monkeypatch, backend):
    """cudnn_benchmark turns cuDNN's algorithm search on inside every network call (so the warm-up before a
    capture fills cuDNN's cache) and gives the caller's setting back after it, also when the call raises."""
    import fastdiff.models.unet as unet_module

    seen = []
    forward = unet_module.UNet.forward

    def spy(self, *a, **k):
        seen.append(torch.backends.cudnn.benchmark)
        return forward(self, *a, **k)

    monkeypatch.setattr(unet_module.UNet, "forward", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    pipe = fastdiff.load("arch:tiny-sd-unet").optimize(backend=backend, cudnn_benchmark=True)
    out = pipe.generate(**KW)
    assert seen and all(seen) and torch.backends.cudnn.benchmark is False
    assert rel_err(out, fastdiff.load("arch:tiny-sd-unet").generate(**KW)) <= 1e-5

    def fail(self, *a, **k):
        assert torch.backends.cudnn.benchmark is True
        raise RuntimeError("network failed")

    monkeypatch.setattr(unet_module.UNet, "forward", fail)
    with pytest.raises(RuntimeError, match="network failed"):
        pipe.generate(**KW)
    assert torch.backends.cudnn.benchmark is False
    seen.clear()
    monkeypatch.setattr(unet_module.UNet, "forward", spy)
    fastdiff.load("arch:tiny-sd-unet").generate(**KW)  # without the switch the flag is left alone
    assert seen and not any(seen)


def test_optimize_refuses_what_is_not_a_switch_and_takes_torch_dtypes():
    """optimize(foo=1) and optimize("triton") say what optimize takes (were a TypeError and an AttributeError);
    dtype=torch.float16, as diffusers users write it, is the same as "fp16"."""
    pipe = fastdiff.load("arch:tiny-unet")
    with pytest.raises(BadArgumentError, match=r"unknown switch\(es\) \['foo'\].*'backend'"):
        pipe.optimize(foo=1)
    with pytest.raises(BadArgumentError, match="expected an OptimizeConfig or keyword switches"):
        pipe.optimize("triton")
    assert OptimizeConfig(dtype=torch.float16).dtype == "fp16"
    assert pipe.optimize(dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(BadArgumentError, match="torch.int8"):
        OptimizeConfig(dtype=torch.int8)


def test_cudnn_benchmark_calls_that_overlap_give_the_callers_flag_back(monkeypatch):
    """Two networks with cudnn_benchmark in two threads, the second entering before the first leaves and leaving
    after it: the flag stays on while either runs, and is the caller's again after both (a plain save / restore
    per call left it on for good)."""
    import threading

    from fastdiff.runtime.runners import CudnnBenchmark

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def net_a():
        a_in.set()
        b_in.wait(10)

    def net_b():
        b_in.set()
        a_done.wait(10)
        seen.append(torch.backends.cudnn.benchmark)  # A has left, B is still inside

    ta = threading.Thread(target=lambda: (CudnnBenchmark(net_a)(), a_done.set()))
    tb = threading.Thread(target=lambda: (a_in.wait(10), CudnnBenchmark(net_b)()))
    ta.start(), tb.start()
    ta.join(10), tb.join(10)
    assert seen == [True] and torch.backends.cudnn.benchmark is False


class _BreaksTheGraph(torch.nn.Module):
    """A user's layer Dynamo cannot trace whole: a branch on a tensor's value."""

    def forward(self, x, t, **kw):
        y = x * 2
        if y.sum() > 0:  # data-dependent control flow: a graph break
            return y + 1
        return y - 1


class _RefusesWideInputs(torch.nn.Module):
    """A model whose forward checks its input's shape: traceable whole, and raising for a bad one."""

    def forward(self, x, t, **kw):
        if x.shape[-1] != 3:
            raise BadArgumentError(f"x: expected 3 columns, found {x.shape[-1]}")
        return x * 3


def test_compile_falls_back_to_graph_breaks_where_a_model_cannot_be_traced_whole(monkeypatch):
    """backend="compile" asks for fullgraph=True; a model with a graph break still runs, compiled in pieces,
    with a warning naming the break. fastdiff's own models stay whole (no warning). Dynamo traces for real here;
    the compiler behind it is Dynamo's "eager" backend, so the test costs no Inductor build."""
    from fastdiff.runtime.config import OptimizeConfig
    from fastdiff.runtime.runners import compile_network

    real_compile, calls = torch.compile, []

    def eager_backend(model, **kw):
        calls.append(kw["fullgraph"])
        return real_compile(model, **{**kw, "backend": "eager", "mode": None})

    monkeypatch.setattr(torch, "compile", eager_backend)
    torch._dynamo.reset()
    config = OptimizeConfig(backend="compile", cuda_graphs=False)
    runner = compile_network(_BreaksTheGraph(), config, torch.device("cpu"), [])
    x = torch.randn(2, 3)
    with pytest.warns(RuntimeWarning, match="cannot be traced as one graph"):
        out = runner(x, None)
    assert torch.equal(out, x * 2 + 1 if (x * 2).sum() > 0 else x * 2 - 1)
    assert calls == [True, False] and runner.fullgraph is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the other branch, and no second warning
        assert torch.equal(runner(-x.abs(), None), -x.abs() * 2 - 1)

    # a model that refuses a bad input: the input's own error, and the compiled model stays whole
    calls.clear()
    runner = compile_network(_RefusesWideInputs(), config, torch.device("cpu"), [])
    assert torch.equal(runner(x, None), x * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(BadArgumentError, match="expected 3 columns, found 4"):
            runner(torch.ones(2, 4), None)
        assert torch.equal(runner(x + 1, None), (x + 1) * 3)
    assert calls == [True] and runner.fullgraph is True

    pipe = fastdiff.load("arch:tiny-dit")
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        runner = compile_network(pipe.model, config, torch.device("cpu"), [])
        spec = pipe.spec
        x = torch.randn(2, spec.in_channels, *spec.sample_size)
        assert rel_err(runner(x, torch.tensor([3.0, 500.0]), class_labels=torch.tensor([1, 2])),
                       pipe.model(x, torch.tensor([3.0, 500.0]), class_labels=torch.tensor([1, 2]))) <= 1e-5
    assert calls == [True] and runner.fullgraph is True
    torch._dynamo.reset()


def test_a_failed_optimize_changes_nothing_and_notes_are_the_last_configs(monkeypatch):
    """A backend that cannot run is refused before the weights are cast (a half-converted bf16 network was left);
    a cast up from bf16 says the rounding stays; each optimize's notes replace the last one's."""
    pipe = fastdiff.load("arch:tiny-dit")
    want = pipe.generate(seeds=[1], class_labels=[2], steps=2, progress=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="backend 'triton' was requested"):
        pipe.optimize(backend="triton", dtype="bf16", channels_last=True)
    assert pipe.dtype == torch.float32 and pipe.config is None and pipe._graph_factory is None
    assert torch.equal(pipe.generate(seeds=[1], class_labels=[2], steps=2, progress=False), want)
    pipe.optimize(fuse_qkv=True, fuse_conditioning=True)  # (a DiT: nothing for fuse_conditioning)
    assert any("fuse_conditioning" in n for n in pipe.notes)
    pipe.optimize(dtype="bf16")
    assert not any("fuse_conditioning" in n for n in pipe.notes)
    pipe.optimize(dtype="fp32")
    assert any("the weights are bfloat16, and a cast up keeps their rounding" in n for n in pipe.notes)


def test_an_export_backend_then_eager_brings_the_text_encoders_and_controlnet_back(tmp_path):
    """optimize(backend='onnxruntime', dtype='fp16') casts the text encoders (and a ControlNet set then) to fp16, the
    network staying fp32 under the graph; a later eager optimize() brings both back to the network's precision
    (they stayed fp16: other prompt states, and a dtype error with the ControlNet); unload_lora() is refused while
    the exported graph holds the merged weights, as load_lora() is."""
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend")
    from fastdiff.models.controlnet import ControlNet
    from test_prompts import sd_pipelines

    _, pipe = sd_pipelines(str(tmp_path))
    fresh = fastdiff.load(str(tmp_path / "pipe"))
    layer = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"  # (32, 16): text -> keys
    lora = {f"{layer}.lora_down.weight": torch.randn(2, 16) * 0.3, f"{layer}.lora_up.weight": torch.randn(32, 2) * 0.3}
    pipe.load_lora(lora)
    pipe.optimize(backend="onnxruntime", dtype="fp16")
    with pytest.raises(BadArgumentError, match="unload_lora\\(\\): this pipeline runs an exported onnxruntime"):
        pipe.unload_lora()
    net = ControlNet.from_unet(pipe.model)
    pipe.set_controlnet(net)
    pipe.optimize()
    pipe.unload_lora()
    assert pipe.prompt_encoder.parts["text_encoder"].dtype == torch.float32
    assert next(net.parameters()).dtype == torch.float32
    fresh.set_controlnet(net)
    kw = dict(prompt="a cat", seeds=[1], steps=2, control_image=torch.rand(1, 3, 16, 16), progress=False)
    assert rel_err(pipe.generate(**kw), fresh.generate(**kw)) <= 1e-5
    # an optimize() that casts nothing leaves the encoders as they are (it re-read them in the network's precision)
    half = fastdiff.load(str(tmp_path / "pipe"), dtype=torch.float16)
    states = half.encode_prompt("a cat")["encoder_hidden_states"]
    half.optimize()
    assert half.prompt_encoder._parts is not None and torch.equal(half.encode_prompt("a cat")["encoder_hidden_states"],
                                                                  states)
