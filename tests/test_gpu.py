"""GPU-only checks, run by bench/gpu_check.sh (``TRITON_INTERPRET=0 pytest -m gpu tests``).

They skip with a reason on a machine without CUDA. On a GPU: the Triton kernels against torch at the
model shapes, the fused backend at model level, CUDA-graph replay (step and loop scopes) against eager,
no recapture for a batch that fits a captured bucket, and compile + graphs together.
"""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from helpers import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    """Full float32 arithmetic in cuBLAS and cuDNN. torch lets cuDNN convolutions round float32 inputs to TF32
    (an 11-bit significand) by default: where two pipelines differ by float32 rounding (the fused Triton
    GroupNorm against torch's), each flipped TF32 rounding turns a 1e-7 difference into one of up to 5e-4. In
    run 6 (H200) the UNet tests comparing an optimized, graphed pipeline with a plain eager one differed by 1.3e-4
    to 3.2e-4 relative, the same in step and loop scope, while the DiT and flow-model tests (GEMMs, which torch
    keeps in float32 by default) met 1e-4. Comparisons at float32 bounds need both sides in float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


needs_compiled_triton = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1",
                                           reason="TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 on the GPU")


@needs_compiled_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("shape,groups", [((2, 320, 64, 64), 32), ((2, 1280, 8, 8), 32), ((3, 123, 7, 5), 41)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("strategy", [None, "rows"])
def test_group_norm_silu_on_gpu(dtype, tol, shape, groups, channels_last, strategy):
    from fastdiff.kernels import group_norm

    x = torch.randn(shape, device="cuda", dtype=dtype) + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], device="cuda", dtype=dtype), torch.randn(shape[1], device="cuda", dtype=dtype)
    want = F.silu(F.group_norm(x.float(), groups, w.float(), b.float(), 1e-5))
    got = group_norm(x, groups, w, b, 1e-5, activation="silu", strategy=strategy)
    assert got.dtype == dtype and rel_err(got.float(), want) <= tol


@needs_compiled_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("b,h,nq,nk,d", [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 16, 256, 256, 72),
                                         (1, 5, 1024, 77, 64), (1, 4, 333, 333, 128)])
def test_attention_on_gpu(dtype, tol, b, h, nq, nk, d):
    from fastdiff.kernels import attention

    q = torch.randn(b, h, nq, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, h, nk, d, device="cuda", dtype=dtype) for _ in range(2))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel_err(attention(q, k, v).float(), want) <= tol


@needs_compiled_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
# few shapes: each (shape class, dtype) autotunes over every tile, and each tile is a compile of its own
@pytest.mark.parametrize("b,h,nq,nk,d", [(2, 8, 4096, 77, 40), (2, 16, 256, 256, 72), (1, 4, 333, 333, 128)])
def test_attention_tma_on_gpu(dtype, tol, b, h, nq, nk, d):
    """The TMA-descriptor kernel (Hopper+): autotuned eager calls, projection views, and a CUDA-graph replay
    (the descriptors are kernel parameters baked into the graph) after the inputs changed in place."""
    import importlib

    tma = importlib.import_module("fastdiff.kernels.attention_tma")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs an sm_90 or newer GPU")
    q = torch.randn(b, nq, h, d, device="cuda", dtype=dtype).transpose(1, 2)  # a projection viewed as heads
    k, v = (torch.randn(b, nk, h, d, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(2))
    assert tma.supported(q, k, v)[0]
    ref = lambda: F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # noqa: E731
    assert rel_err(tma.attention_tma(q, k, v).float(), ref()) <= tol
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tma.attention_tma(q, k, v, out=out)
    q.copy_(torch.randn_like(q))
    graph.replay()
    assert rel_err(out.float(), ref()) <= tol


@needs_compiled_triton
@pytest.mark.parametrize("layout", ["projection", "unaligned"])
@pytest.mark.parametrize("d", [40, 72])
def test_attention_layouts_on_gpu(layout, d):
    """The layouts the 16-byte alignment hint must get right: a (B, N, H*D) projection viewed as heads (aligned
    rows, hinted) and views starting 2 bytes into their buffers (not hinted: ALIGN = 1), output poisoned."""
    from fastdiff.kernels import attention
    from fastdiff.kernels.attention import row_alignment

    b, h, nq, nk = 2, 8, 300, 77
    if layout == "projection":
        q = torch.randn(b, nq, h * d, device="cuda", dtype=torch.float16).view(b, nq, h, d).transpose(1, 2)
        k, v = (torch.randn(b, nk, h * d, device="cuda", dtype=torch.float16).view(b, nk, h, d).transpose(1, 2)
                for _ in range(2))
        out = torch.full((b, nq, h, d), float("nan"), device="cuda", dtype=torch.float16).transpose(1, 2)
        assert row_alignment(q, k, v, out) == 8
    else:
        def view(n):
            return torch.randn(1 + b * h * n * d, device="cuda", dtype=torch.float16)[1:].view(b, h, n, d)
        q, k, v = view(nq), view(nk), view(nk)
        out = torch.full((1 + b * h * nq * d,), float("nan"), device="cuda", dtype=torch.float16)[1:].view(b, h, nq, d)
        assert row_alignment(q, k, v, out) == 1
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel_err(attention(q, k, v, out=out).float(), want) <= 1e-2


@needs_compiled_triton
def test_adaln_on_gpu():
    from fastdiff.kernels import adaln_modulate, gated_residual, gated_residual_modulate

    x, y = (torch.randn(2, 256, 1152, device="cuda", dtype=torch.float16) for _ in range(2))
    shift, scale, gate = (torch.randn(2, 1152, device="cuda", dtype=torch.float16) for _ in range(3))
    want = F.layer_norm(x.float(), (1152,), eps=1e-6) * (1 + scale.float()[:, None]) + shift.float()[:, None]
    assert rel_err(adaln_modulate(x, shift, scale).float(), want) <= 2e-2
    residual = x.float() + gate.float()[:, None] * y.float()
    assert rel_err(gated_residual(x, gate, y).float(), residual) <= 1e-2
    xo, h = gated_residual_modulate(x, gate, y, shift, scale)  # one pass: x' and the norm of x'
    assert rel_err(xo.float(), residual) <= 1e-2
    assert rel_err(h.float(), adaln_modulate(gated_residual(x, gate, y), shift, scale).float()) <= 1e-2
    from fastdiff.kernels import residual_layer_norm  # SD's transformer: a plain residual, an affine LayerNorm

    x, y = (torch.randn(2, 4096, 320, device="cuda", dtype=torch.float16) for _ in range(2))
    w, b = torch.randn(320, device="cuda", dtype=torch.float16), torch.randn(320, device="cuda", dtype=torch.float16)
    xo, h = residual_layer_norm(x, y, w, b)
    assert rel_err(xo.float(), x.float() + y.float()) <= 1e-2
    assert rel_err(h.float(), F.layer_norm(x.float() + y.float(), (320,), w.float(), b.float())) <= 2e-2


@needs_compiled_triton
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (4, 4, 32, 32), (3, 5, 7)])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_fused_state_update_on_gpu(shape, n):
    from fastdiff.kernels import lincomb
    from fastdiff.state_update import combine_torch

    terms = [(c, torch.randn(shape, device="cuda")) for c in (0.7, -1.3, 0.4, 0.2, -2.1)[:n]]
    assert rel_err(lincomb(terms), combine_torch(terms)) <= 1e-6


@needs_compiled_triton
@pytest.mark.parametrize("shape", [(2, 4096, 2560), (2, 77, 2 * 99)])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_geglu_on_gpu(shape, dtype, tol):
    from fastdiff.kernels import geglu

    x = torch.randn(shape, device="cuda", dtype=dtype)
    h, gate = x.float().chunk(2, dim=-1)
    assert rel_err(geglu(x).float(), h * F.gelu(gate)) <= tol


@needs_compiled_triton
def test_fused_state_update_in_a_loop_graph_equals_torch():
    kw = dict(seeds=[1, 2], class_labels=[1, 2], steps=4, sampler="dpmpp_2m_sde", cfg_scale=3.0, progress=False)
    base = dict(backend="triton", cuda_graphs=True, graph_scope="loop", batch_buckets=(2,))
    want = fastdiff.load("arch:tiny-dit", device="cuda").optimize(
        **base, kernel_ops={"sampler_update": "torch"}).generate(**kw)
    pipe = fastdiff.load("arch:tiny-dit", device="cuda").optimize(**base, kernel_ops={"sampler_update": "triton"})
    assert pipe.update_impl == "triton"
    assert rel_err(pipe.generate(**kw), want) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
def test_dit_mlp_fused_gelu_on_gpu(dtype, tol):
    """fc1 + GELU(tanh) as one cuBLASLt GEMM equals the two-kernel path."""
    from fastdiff.models.dit import Mlp

    mlp = Mlp(1152, 4608).to("cuda", dtype)
    x = torch.randn(2, 256, 1152, device="cuda", dtype=dtype)
    assert mlp.fused_gelu(x)
    want = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    assert rel_err(mlp(x).float(), want.float()) <= tol


def _two_samples(arch: str, steps: int) -> dict:
    """generate() keywords for two seeds of a tiny preset: guided class labels for DiT, text states for the
    text UNet, nothing more for the unconditional one."""
    kw = dict(seeds=[1, 2], steps=steps, sampler="dpmpp_2m", progress=False)
    if arch == "tiny-dit":
        kw.update(class_labels=[1, 2], cfg_scale=3.0)
    elif arch == "tiny-sd-unet":
        kw.update(encoder_hidden_states=torch.randn(2, 7, 32, device="cuda"))
    return kw


@needs_compiled_triton
@pytest.mark.parametrize("arch", ["tiny-sd-unet", "tiny-dit"])
def test_tuned_kernel_choice_on_gpu(arch):
    """kernel_ops="tune" measures every layer's implementations in CUDA graphs and runs the fastest."""
    from fastdiff.models.layers import op_backends

    kw = _two_samples(arch, steps=3)
    eager = fastdiff.load(f"arch:{arch}", device="cuda", dtype=torch.float16).generate(**kw)
    pipe = fastdiff.load(f"arch:{arch}", device="cuda", dtype=torch.float16).optimize(
        backend="triton", kernel_ops="tune", cuda_graphs=True, graph_scope="loop", batch_buckets=(2, 4))
    got = pipe.generate(**kw)
    assert "tune" not in op_backends(pipe.model).values()  # every layer measured (or shared a measurement)
    assert all(m.tune_times for m in pipe.model.modules() if getattr(m, "backend", None) == "tune")
    assert rel_err(got, eager) <= 2e-2


@needs_compiled_triton
@pytest.mark.parametrize("arch", ["tiny-unet", "tiny-dit"])
def test_triton_backend_model_level_on_gpu(arch):
    kw = _two_samples(arch, steps=4)
    eager = fastdiff.load(f"arch:{arch}", device="cuda", dtype=torch.float16).generate(**kw)
    fused = fastdiff.load(f"arch:{arch}", device="cuda", dtype=torch.float16).optimize(backend="triton").generate(**kw)
    assert rel_err(fused, eager) <= 2e-2


@needs_compiled_triton
@pytest.mark.parametrize("precompute,resnorm", [(False, False), (True, True)])
def test_dit_fused_adaln_in_a_loop_graph_on_gpu(precompute, resnorm):
    """fuse_adaln (one GEMM for every adaLN projection; strided per-layer rows into the Triton adaLN kernels)
    under the triton backend and a captured loop equals eager sampling; with ``precompute_adaln`` every step's
    modulation comes from one GEMM inside the graph, and a replay with other labels follows them; with
    ``resnorm`` each residual and the norm after it run as one kernel."""
    from helpers import perturb_

    model = perturb_(fastdiff.load("arch:tiny-dit").model, seed=3, std=0.2)  # no zero-initialised adaLN
    kw = dict(seeds=[1, 2], steps=4, sampler="dpmpp_2m", cfg_scale=3.0, progress=False)
    eager = fastdiff.load("arch:tiny-dit", device="cuda", dtype=torch.float16)
    pipe = fastdiff.load("arch:tiny-dit", device="cuda", dtype=torch.float16)
    for p in (eager, pipe):
        p.model.load_state_dict(model.state_dict())
    pipe.optimize(backend="triton", fuse_adaln=True, precompute_adaln=precompute, cuda_graphs=True,
                  graph_scope="loop", batch_buckets=(2, 4),
                  kernel_ops={"adaln_modulate": "triton" if resnorm else "triton_pair"})
    assert pipe.model.adaln_weight is not None and pipe.precompute_adaln == precompute
    at_once, inner = [], pipe.model.modulation_for_calls
    pipe.model.modulation_for_calls = lambda *a: at_once.append(1) or inner(*a)
    for labels in ([1, 2], [7, 3]):  # the second call replays the captured loop
        assert rel_err(pipe.generate(class_labels=labels, **kw), eager.generate(class_labels=labels, **kw)) <= 2e-2
    assert pipe.loop_graphs.captures == 1
    assert len(at_once) == (3 if precompute else 0)  # the graph's two warm-up runs and its capture


@needs_compiled_triton
@pytest.mark.parametrize("conv_bias", [False, True])
def test_unet_fused_conditioning_in_a_loop_graph_on_gpu(conv_bias):
    """fuse_conditioning (the resnets' time projections and the cross-attention keys / values, one GEMM per
    group; GroupNorm reading its strided part in place) under the triton backend, channels-last and a captured
    loop equals eager sampling; with ``fuse_conv_bias`` the 1x1 convolutions run as GEMMs and the biases join
    the time embedding and the shortcuts."""
    from helpers import perturb_

    model = perturb_(fastdiff.load("arch:tiny-sd-unet").model, seed=2, std=0.1)
    ctx = torch.randn(1, 6, 32, device="cuda")
    kw = dict(seeds=[1, 2], steps=4, sampler="dpmpp_2m", encoder_hidden_states=ctx,
              negative_encoder_hidden_states=torch.zeros_like(ctx), cfg_scale=4.0, progress=False)
    eager = fastdiff.load("arch:tiny-sd-unet", device="cuda", dtype=torch.float16)
    pipe = fastdiff.load("arch:tiny-sd-unet", device="cuda", dtype=torch.float16)
    for p in (eager, pipe):
        p.model.load_state_dict(model.state_dict())
    pipe.optimize(backend="triton", fuse_conditioning=True, channels_last=True, cuda_graphs=True,
                  graph_scope="loop", batch_buckets=(2,), fuse_conv_bias=conv_bias)
    assert pipe.model.temb_weight is not None and pipe.model.cross_kv_weight is not None
    assert rel_err(pipe.generate(**kw), eager.generate(**kw)) <= 2e-2


@needs_compiled_triton
@pytest.mark.parametrize("arch", ["tiny-dit", "tiny-sd-unet"])
def test_gpu_defaults_equal_eager(arch):
    """optimize() with the measured defaults on CUDA (run 4): a DiT precomputes its adaLN modulation in the loop
    graph and runs its attention on the TMA kernel (the pointer kernel before Hopper), each residual and its norm
    in one pass; a UNet stacks its conditioning projections and, channels-last, moves its convolution biases
    (run 5), and runs its attention, LayerNorms and state update on Triton (run 6). Samples equal eager sampling."""
    from fastdiff.models.layers import op_backends
    from fastdiff.models.unet import ResnetBlock
    from helpers import perturb_

    model = perturb_(fastdiff.load(f"arch:{arch}").model, seed=4, std=0.1)
    kw = dict(seeds=[1, 2], steps=4, sampler="dpmpp_2m", cfg_scale=3.0, progress=False)
    if arch == "tiny-dit":
        kw["class_labels"] = [1, 2]
    else:
        ctx = torch.randn(1, 6, 32, device="cuda")
        kw.update(encoder_hidden_states=ctx, negative_encoder_hidden_states=torch.zeros_like(ctx))
    eager = fastdiff.load(f"arch:{arch}", device="cuda", dtype=torch.float16)
    pipe = fastdiff.load(f"arch:{arch}", device="cuda", dtype=torch.float16)
    for p in (eager, pipe):
        p.model.load_state_dict(model.state_dict())
    pipe.optimize(backend="triton", cuda_graphs=True, graph_scope="loop", batch_buckets=(2,),
                  channels_last=arch != "tiny-dit")
    if arch == "tiny-dit":
        assert pipe.precompute_adaln and op_backends(pipe.model) == {"ModulatedLayerNorm": "triton",
                                                                     "Attention": "triton_tma"}
    else:
        assert pipe.model.temb_weight is not None and pipe.model.cross_kv_weight is not None
        assert all(m.fuse_conv_bias for m in pipe.model.modules() if isinstance(m, ResnetBlock))
        # (run 6: the Triton attention, the one-pass residual + LayerNorm and the fused state update)
        assert op_backends(pipe.model) == {"GroupNorm": "triton", "Attention": "triton", "GEGLU": "triton",
                                           "LayerNorm": "triton"} and pipe.update_impl == "triton"
    assert rel_err(pipe.generate(**kw), eager.generate(**kw)) <= 2e-2


@pytest.mark.parametrize("scope", ["step", "loop"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "plms", "lcm"])
def test_cuda_graph_replay_equals_eager(scope, sampler):
    kw = dict(steps=4, sampler=sampler, cfg_scale=3.0, progress=False)
    eager = fastdiff.load("arch:tiny-dit", device="cuda")
    graphed = fastdiff.load("arch:tiny-dit", device="cuda").optimize(cuda_graphs=True, graph_scope=scope,
                                                                     batch_buckets=(1, 2, 4))
    for seeds, labels in (([1, 2, 3], [0, 4, 9]), ([7], [2]), ([8, 9, 10], [3, 3, 3])):
        want = eager.generate(seeds=seeds, class_labels=labels, **kw)
        got = graphed.generate(seeds=seeds, class_labels=labels, **kw)
        assert rel_err(got, want) <= 1e-4
    captures = graphed.loop_graphs.captures if scope == "loop" else graphed.runner.captures
    graphed.generate(seeds=[11, 12, 13], class_labels=[1, 2, 3], **kw)  # fits a captured bucket
    assert (graphed.loop_graphs.captures if scope == "loop" else graphed.runner.captures) == captures


def test_graph_captures_leave_no_cublas_workspace_behind():
    """Each stream that runs a GEMM keeps a cuBLAS + cuBLASLt workspace (33 MiB on Hopper) for the life of the process:
    fastdiff warms up and captures on one side stream per device, so further captures add only their graphs'
    outputs. With a fresh stream per capture (before stop 36) each one left 33 MiB behind (run 7: SD1.5's bench rows
    read 33 MiB more peak memory per variant before them)."""
    from fastdiff.runtime.graphs import CudaGraph

    torch.cuda.synchronize()
    # earlier tests' streams already hold workspaces, which would hide new ones (no earlier graph is replayed again)
    getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
    w = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    graphs = [CudaGraph(lambda a: a @ w, [x])]
    torch.cuda.synchronize()
    after_first = torch.cuda.memory_allocated()
    graphs += [CudaGraph(lambda a: a @ w, [x]) for _ in range(3)]
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - after_first
    assert grown < 4 * 2**20, f"three more captures kept {grown / 2**20:.1f} MiB (a workspace per stream?)"
    assert torch.allclose(graphs[-1].replay(), x @ w)


def test_capture_while_another_thread_allocates():
    """fastdiff's graph capture holds while another thread allocates fresh device memory, runs a kernel and syncs its
    own stream in the middle of it (an Engine client encoding a prompt, a second thread on a shared pipe):
    ``capture_error_mode="thread_local"``. Under the default ("global") that thread's cudaMalloc fails and the
    capture is invalidated. The captured function waits for the other thread, so the overlap is certain."""
    import threading

    from fastdiff.runtime.graphs import CudaGraph

    capturing, allocated, errors = threading.Event(), threading.Event(), []

    def fn(x):
        if torch.cuda.is_current_stream_capturing():
            capturing.set()
            assert allocated.wait(60), "the other thread did not finish"
        return x * 2 + 1

    def allocate():
        try:
            assert capturing.wait(60), "no capture began"
            with torch.cuda.stream(torch.cuda.Stream()):
                t = torch.empty(123_457_000, device="cuda")  # a size no cached block serves: a cudaMalloc
                t.fill_(1.0)
                assert t[:4].sum().item() == 4.0  # a sync of this thread's own stream
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            allocated.set()

    worker = threading.Thread(target=allocate)
    worker.start()
    x = torch.randn(3, 5, device="cuda")
    try:
        graph = CudaGraph(fn, [x])
    finally:
        worker.join(60)
    assert not errors, errors
    x.copy_(torch.arange(15.0, device="cuda").view(3, 5))
    assert torch.equal(graph.replay(), torch.arange(15.0, device="cuda").view(3, 5) * 2 + 1)


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_cuda_graph_replay_on_a_flow_model(scope):
    """A flow-matching DiT (FlowMatchEuler, shift 3) in both frames: t-frame Heun, sigma-frame DPM-Solver++,
    and the scheduler's own Euler."""
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    eager = fastdiff.load("arch:tiny-dit", device="cuda", scheduler=flow)
    graphed = fastdiff.load("arch:tiny-dit", device="cuda", scheduler=flow).optimize(
        cuda_graphs=True, graph_scope=scope, batch_buckets=(1, 2, 4))
    for sampler in (None, "heun", "dpmpp_2m"):
        kw = dict(seeds=[1, 2, 3], class_labels=[0, 4, 9], steps=4, sampler=sampler, cfg_scale=3.0, progress=False)
        assert rel_err(graphed.generate(**kw), eager.generate(**kw)) <= 1e-4, sampler


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_image_to_image_in_cuda_graphs_equals_eager(scope):
    """generate(image=...) on the GPU (builtin:digits, a pixel model): a captured loop's shorter grid and its start
    state from the noised image equal eager; a second image replays the loop."""
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 1, 16, 16, generator=g)
    eager = fastdiff.load("builtin:digits", device="cuda")
    graphed = fastdiff.load("builtin:digits", device="cuda").optimize(cuda_graphs=True, graph_scope=scope,
                                                                      batch_buckets=(1, 2))
    kw = dict(seeds=[1, 2], class_labels=[3, 5], steps=8, strength=0.6, cfg_scale=2.0, progress=False)
    for image in (images, images.flip(0)):
        assert rel_err(graphed.generate(image=image, **kw), eager.generate(image=image, **kw)) <= 1e-4
    if scope == "loop":
        assert graphed.loop_graphs.captures == 1


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_inpainting_a_regular_model_in_cuda_graphs_equals_eager(scope):
    """generate(image=, mask_image=) on a pixel model: the known region pasted back after every step is part of the
    captured loop (its image, noise and mask are static inputs); a new image and mask replay it."""
    g = torch.Generator().manual_seed(4)
    images, masks = torch.rand(2, 1, 16, 16, generator=g), (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    eager = fastdiff.load("builtin:digits", device="cuda")
    graphed = fastdiff.load("builtin:digits", device="cuda").optimize(cuda_graphs=True, graph_scope=scope,
                                                                      batch_buckets=(1, 2))
    kw = dict(seeds=[1, 2], class_labels=[3, 5], steps=8, sampler="euler_ancestral", cfg_scale=2.0, progress=False)
    for image, mask in ((images, masks), (images.flip(0), 1 - masks)):
        got = graphed.generate(image=image, mask_image=mask, **kw)
        assert rel_err(got, eager.generate(image=image, mask_image=mask, **kw)) <= 1e-4
        assert torch.equal(got.cpu()[mask.expand_as(got) < 0.5], (image * 2 - 1)[mask.expand_as(got) < 0.5])
    if scope == "loop":
        assert graphed.loop_graphs.captures == 1


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_a_lora_merged_after_capture_reaches_the_replayed_graphs(scope):
    """load_lora writes the weights in place: graphs captured before it (with CUDA's defaults, stacked q / k / v
    and conditioning projections among them) replay with the LoRA, equal to eager with it, nothing recaptured."""
    from helpers import lora_state

    g = torch.Generator().manual_seed(1)
    eager = fastdiff.load("arch:tiny-sd-unet", device="cuda")
    states = torch.randn(2, 2, 77, eager.spec.cross_attention_dim, generator=g).cuda()
    kw = dict(seeds=[1, 2], steps=4, cfg_scale=2.0, encoder_hidden_states=states[0],
              negative_encoder_hidden_states=states[1], progress=False)
    graphed = fastdiff.load("arch:tiny-sd-unet", device="cuda").optimize(cuda_graphs=True, graph_scope=scope,
                                                                         batch_buckets=(2,))
    before = graphed.generate(**kw)
    state = lora_state(eager.model)
    eager.load_lora(state, scale=0.8)
    graphed.load_lora(state, scale=0.8)
    after = graphed.generate(**kw)
    assert rel_err(after, eager.generate(**kw)) <= 1e-4 and rel_err(after, before) > 1e-3
    if scope == "loop":
        assert graphed.loop_graphs.captures == 1


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_a_controlnet_in_cuda_graphs_equals_eager(scope):
    """The UNet and its ControlNet captured as one network (CUDA's defaults, fused projections in both) equal eager;
    new images, scales, windows and guess mode replay the same graph."""
    import copy

    from fastdiff.models.controlnet import ControlNet

    g = torch.Generator().manual_seed(2)
    eager = fastdiff.load("arch:tiny-sd-unet", device="cuda")
    controlnet = ControlNet.from_unet(eager.model, conditioning_embedding_out_channels=(8, 16, 16, 32))
    with torch.no_grad():  # (from_unet's zero convolutions would make it change nothing)
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    graphed = fastdiff.load("arch:tiny-sd-unet", device="cuda").optimize(cuda_graphs=True, graph_scope=scope,
                                                                         batch_buckets=(2,))
    graphed.set_controlnet(copy.deepcopy(controlnet))
    eager.set_controlnet(controlnet)
    h, w = eager.spec.sample_size
    states = torch.randn(2, 2, 77, eager.spec.cross_attention_dim, generator=g).cuda()
    kw = dict(seeds=[1, 2], steps=4, cfg_scale=2.0, encoder_hidden_states=states[0],
              negative_encoder_hidden_states=states[1], progress=False)
    for seed, options in ((0, {}), (1, dict(controlnet_conditioning_scale=0.5, control_guidance_end=0.5)),
                          (2, dict(guess_mode=True))):
        image = torch.rand(2, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(seed))
        want = eager.generate(control_image=image, **options, **kw)
        assert rel_err(graphed.generate(control_image=image, **options, **kw), want) <= 1e-4
    if scope == "loop":
        assert graphed.loop_graphs.captures == 1


def _transformer_with_controlnet(kind: str, device: str):
    """(``arch:tiny-flux`` / ``arch:tiny-sd3`` with a random VAE (an encoder: the control image is encoded) and a
    random FLUX.1 / SD3 ControlNet of fewer blocks, its layers not zeroed, on ``device``; the text arguments)."""
    from fastdiff.models.vae import VAEConfig, VAEDecoder

    torch.manual_seed(3)
    pipe = fastdiff.load(f"arch:tiny-{kind}", device=device)
    pipe.vae = VAEDecoder(VAEConfig(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                    scaling_factor=0.3611, shift_factor=0.1159), with_encoder=True).to(device).eval()
    if kind == "flux":
        from fastdiff.models.flux_controlnet import FluxControlNet

        controlnet = FluxControlNet(dataclasses.replace(pipe.model.config, num_layers=1, num_single_layers=1),
                                    num_mode=3)
    else:
        from fastdiff.models.sd3_controlnet import SD3ControlNet

        controlnet = SD3ControlNet(dataclasses.replace(pipe.model.config, num_layers=2))
    pipe.set_controlnet(controlnet.eval())
    g = torch.Generator().manual_seed(4)
    ctx = torch.randn(2, 7, pipe.spec.cross_attention_dim, generator=g).to(device)
    pooled = torch.randn(2, pipe.spec.text_embeds_dim, generator=g).to(device)
    text = dict(encoder_hidden_states=ctx, text_embeds=pooled)
    if kind == "sd3":  # (SD3 with CFG: each pass runs the ControlNet on its own text)
        text.update(cfg_scale=3.0, negative_encoder_hidden_states=ctx.flip(0), negative_text_embeds=pooled.flip(0))
    return pipe, text


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("scope", ["step", "loop"])
def test_transformer_controlnets_in_cuda_graphs_equal_eager(kind, scope):
    """An SD3 / FLUX.1 transformer and its ControlNet captured as one network equal eager; new images, scales,
    windows (and a Union ControlNet's types) replay the same graph."""
    import copy

    eager, text = _transformer_with_controlnet(kind, "cuda")
    graphed = copy.deepcopy(eager).optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(2,))
    f = eager.vae.downscale
    h, w = eager.spec.sample_size
    for seed, options in ((0, {}), (1, dict(controlnet_conditioning_scale=0.5, control_guidance_end=0.5))):
        if kind == "flux":
            options["control_mode"] = seed + 1
        image = torch.rand(2, 3, f * h, f * w, generator=torch.Generator().manual_seed(seed))
        kw = dict(seeds=[1, 2], steps=4, control_image=image, progress=False, **options, **text)
        assert rel_err(graphed.generate(**kw), eager.generate(**kw)) <= 1e-4
    if scope == "loop":
        assert graphed.loop_graphs.captures == 1


def test_compile_with_cuda_graphs_equals_eager():
    kw = dict(seeds=[1, 2], class_labels=[1, 2], steps=3, sampler="dpmpp_2m", cfg_scale=2.0, progress=False)
    eager = fastdiff.load("arch:tiny-dit", device="cuda").generate(**kw)
    fast = fastdiff.load("arch:tiny-dit", device="cuda").optimize(backend="compile", cuda_graphs=True,
                                                                  batch_buckets=(2, 4))
    assert rel_err(fast.generate(**kw), eager) <= 1e-4


@pytest.mark.parametrize("backend", ["flash", "efficient"])
def test_pinned_sdpa_backend_equals_default_on_gpu(backend):
    kw = dict(seeds=[1, 2], class_labels=[1, 2], steps=3, sampler="dpmpp_2m", cfg_scale=2.0, progress=False)
    want = fastdiff.load("arch:tiny-dit", device="cuda", dtype=torch.float16).generate(**kw)
    pinned = fastdiff.load("arch:tiny-dit", device="cuda", dtype=torch.float16).optimize(sdpa_backend=backend)
    assert rel_err(pinned.generate(**kw), want) <= 2e-2


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_cudnn_benchmark_in_captured_graphs_equals_eager(scope):
    """cuDNN's algorithm search runs in the warm-up before each capture, never inside one: the captured UNet
    (channels-last fp16 convolutions) equals eager, and the process-wide flag is the caller's again after."""
    ctx = torch.randn(1, 6, 32, device="cuda")
    kw = dict(seeds=[1, 2], steps=3, sampler="dpmpp_2m", encoder_hidden_states=ctx,
              negative_encoder_hidden_states=torch.zeros_like(ctx), cfg_scale=4.0, progress=False)
    want = fastdiff.load("arch:tiny-sd-unet", device="cuda", dtype=torch.float16).generate(**kw)
    before = torch.backends.cudnn.benchmark
    pipe = fastdiff.load("arch:tiny-sd-unet", device="cuda", dtype=torch.float16).optimize(
        cudnn_benchmark=True, channels_last=True, cuda_graphs=True, graph_scope=scope, batch_buckets=(2, 4))
    assert rel_err(pipe.generate(**kw), want) <= 2e-2
    assert torch.backends.cudnn.benchmark == before


def _two_random_ip_adapters(unet, embed: int = 8) -> list:
    """Two base IP-Adapter state dicts (random, 4 tokens each) that fit ``unet``'s cross-attention layers."""
    from fastdiff.models.ip_adapter import cross_attentions

    layers, states = cross_attentions(unet), []
    width = layers[0].to_k.in_features
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        proj = {"proj.weight": torch.randn(4 * width, embed, generator=g) * 0.3,
                "proj.bias": torch.randn(4 * width, generator=g) * 0.1,
                "norm.weight": 1 + torch.randn(width, generator=g) * 0.1, "norm.bias": torch.zeros(width)}
        branches = {f"{2 * i + 1}.to_{kv}_ip.weight": torch.randn(m.heads * m.head_dim, width, generator=g) * 0.3
                    for i, m in enumerate(layers) for kv in "kv"}
        states.append({"image_proj": proj, "ip_adapter": branches})
    return states


@needs_compiled_triton
@pytest.mark.parametrize("scope", ["step", "loop"])
def test_cuda_graph_replay_with_two_ip_adapters_and_masks(scope):
    """Two IP-Adapters (their features a tuple of tensors, masks for one) through real CUDA graphs: equal to eager;
    other images and masks replay the captured graph."""
    eager = fastdiff.load("arch:tiny-sd-unet", device="cuda")
    graphed = fastdiff.load("arch:tiny-sd-unet", device="cuda").optimize(cuda_graphs=True, graph_scope=scope,
                                                                          batch_buckets=(4,))
    states = _two_random_ip_adapters(eager.model)
    for p in (eager, graphed):
        p.load_ip_adapter(states, scale=[[0.7, 0.4], 0.5])
    g = torch.Generator().manual_seed(3)
    text = torch.randn(3, 5, eager.model.config.cross_attention_dim, generator=g)
    for attempt in range(2):
        embeds = [torch.randn(1, 2, 8, generator=g), torch.randn(1, 1, 8, generator=g)]
        masks = (torch.rand(1, 2, 64, 64, generator=g) > 0.5).float()
        kw = dict(seeds=[1, 2, 3], steps=3, cfg_scale=3.0, progress=False, encoder_hidden_states=text,
                  negative_encoder_hidden_states=torch.zeros_like(text),
                  ip_adapter_image_embeds=[torch.cat([torch.zeros_like(e), e]) for e in embeds],
                  ip_adapter_masks=[masks, None])
        want, got = eager.generate(**kw), graphed.generate(**kw)
        assert rel_err(got, want) <= 1e-4
        captures = graphed.loop_graphs.captures if scope == "loop" else graphed.runner.captures
        assert captures == 1, attempt  # (the second attempt replayed the first's graph)
