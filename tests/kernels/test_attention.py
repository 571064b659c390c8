"""fastdiff.kernels.attention vs float64 SDPA, on the CPU through Triton's interpreter.

bfloat16: Triton 3.9's interpreter computes ``tl.dot`` on bfloat16 operands wrongly, so under the
interpreter the launcher upcasts the dot operands to float32 (``DOT_FP32``) while keeping the bfloat16
loads, the P -> bfloat16 rounding and the bfloat16 store; the bfloat16 ``tl.dot`` itself is covered by the
ahead-of-time compile in test_aot.py.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from fastdiff.errors import BadArgumentError
from fastdiff.kernels import attention

# (rtol, atol) against float64 SDPA on the same rounded inputs; P is rounded to the input dtype before P @ V.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 3e-2)}
DTYPES = list(TOL)

SHAPES = [  # (B, H, Nq, Nk, D): self / cross, token counts off the block size, every model head dim
    (1, 2, 77, 77, 40),
    (2, 1, 5, 77, 72),
    (1, 1, 123, 7, 32),
    (1, 1, 16, 16, 64),
    (1, 2, 33, 20, 80),
    (1, 1, 7, 123, 128),
    (1, 1, 9, 17, 20),  # one padded, masked block (32 columns for 20)
    (1, 1, 5, 40, 160),  # main 128 + an unmasked tail of 32
    (1, 1, 3, 5, 8),  # narrower than tl.dot's 16
]


def make_qkv(B, H, NQ, NK, D, dtype, layout):
    """Non-zero-mean q, k, v; "strided" gives (B, N, H, D) memory viewed as (B, H, N, D) (a projection's output)."""
    if layout == "strided":
        q = (torch.randn(B, NQ, H, D) + 0.5).to(dtype).transpose(1, 2)
        k = (torch.randn(B, NK, H, D) - 0.3).to(dtype).transpose(1, 2)
        v = (torch.randn(B, H, D, NK) + 1.0).to(dtype).transpose(2, 3)
    else:
        q = (torch.randn(B, H, NQ, D) + 0.5).to(dtype)
        k = (torch.randn(B, H, NK, D) - 0.3).to(dtype)
        v = (torch.randn(B, H, NK, D) + 1.0).to(dtype)
    return q, k, v


def reference(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)


def assert_close(o, ref, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(o.double(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}H{h}q{q}k{k}d{d}" for b, h, q, k, d in SHAPES])
def test_attention_matches_sdpa(shape, dtype, layout):
    q, k, v = make_qkv(*shape, dtype, layout)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    o = attention(q, k, v, out=out)
    assert o is out
    assert_close(o, reference(q, k, v), dtype)


def test_head_tiles_split_instead_of_padding():
    """Head dims off a power of two: a main block plus a >= 16 tail when that is narrower than padding."""
    from fastdiff.kernels.attention import head_tiles

    assert head_tiles(40) == (32, 16) and head_tiles(72) == (64, 16) and head_tiles(80) == (64, 16)
    assert head_tiles(64) == (64, 0) and head_tiles(128) == (128, 0) and head_tiles(160) == (128, 32)
    assert head_tiles(20) == (32, 0) and head_tiles(8) == (16, 0) and head_tiles(100) == (128, 0)
    for d in range(1, 257):
        main, tail = head_tiles(d)
        assert main + tail >= d and main >= 16 and tail in (0,) + tuple(2 ** i for i in range(4, 9))


def test_row_alignment_is_claimed_only_when_every_row_starts_16_byte_aligned():
    """The kernel tells the compiler every (batch, head, row) start is a multiple of ALIGN elements: only
    true for a unit head-dim stride, 16-byte multiples as the other strides and a 16-byte aligned start."""
    from fastdiff.kernels.attention import row_alignment

    q, k, v = make_qkv(1, 2, 9, 7, 40, torch.float16, "contiguous")
    assert row_alignment(q, k, v) == 8  # 40 halves = 80 bytes per row
    assert row_alignment(*make_qkv(1, 2, 9, 7, 40, torch.float32, "contiguous")) == 4
    assert row_alignment(q, k, v.transpose(2, 3).contiguous().transpose(2, 3)) == 1  # head dim not unit stride
    assert row_alignment(*make_qkv(1, 2, 9, 7, 36, torch.float16, "contiguous")) == 1  # 72-byte rows
    base = torch.randn(1 + 2 * 9 * 40).half()
    assert row_alignment(base[1:].view(1, 2, 9, 40), k, v) == 1  # a view starting 2 bytes into its storage


@pytest.mark.parametrize("offset", [0, 1, 8])
def test_attention_reads_rows_at_any_alignment(offset):
    """Inputs and output starting off a 16-byte boundary (views into a larger buffer) still match SDPA."""
    B, H, NQ, NK, D = 1, 2, 19, 23, 40
    buf = torch.randn(offset + 3 * B * H * NK * D, dtype=torch.float32) + 0.2
    q, k, v = (buf[offset + i * B * H * NK * D:][:B * H * NK * D].view(B, H, NK, D) for i in range(3))
    q = q[:, :, :NQ]
    out_buf = torch.full((offset + B * H * NQ * D,), float("nan"))
    out = out_buf[offset:].view(B, H, NQ, D)
    assert_close(attention(q, k, v, out=out), reference(q, k, v), torch.float32)


def test_head_dim_split_is_off_on_cuda_unless_forced(monkeypatch):
    """The split crashed compiled on an H200 (triton 3.6): CUDA launches pad the head dim unless forced."""
    from fastdiff.kernels.attention import launch_config

    monkeypatch.delenv("FASTDIFF_ATTENTION_SPLIT", raising=False)
    assert (launch_config(256, 256, 72, torch.float16, "cuda")["block_d"],
            launch_config(256, 256, 72, torch.float16, "cuda")["block_d2"]) == (128, 0)
    assert launch_config(256, 256, 72, torch.float16, "cpu")["block_d2"] == 16
    monkeypatch.setenv("FASTDIFF_ATTENTION_SPLIT", "1")
    assert launch_config(256, 256, 40, torch.float16, "cuda")["block_d2"] == 16
    monkeypatch.setenv("FASTDIFF_ATTENTION_SPLIT", "0")
    assert launch_config(256, 256, 40, torch.float16, "cpu")["block_d"] == 64


@pytest.mark.parametrize("d", [40, 72])
def test_padded_head_dim_matches_sdpa(d, monkeypatch):
    """The padded path (what CUDA runs): one masked power-of-two tile over the head dim."""
    monkeypatch.setenv("FASTDIFF_ATTENTION_SPLIT", "0")
    q, k, v = make_qkv(1, 2, 33, 77, d, torch.float32, "strided")
    out = torch.full(q.shape, float("nan"))
    assert_close(attention(q, k, v, out=out), reference(q, k, v), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fixed_tiles_keep_64_rows_per_warpgroup(dtype):
    """The fixed (untuned) half-precision tiles give each warpgroup of 4 warps at least 64 query rows, the
    wgmma tile height on Hopper: with fewer, triton 3.1 (torch 2.5's pin) aborts the process while compiling
    for sm_90 (seen with 64 rows on 8 warps at D = 128 / 160)."""
    from fastdiff.kernels.attention import launch_config

    for d in (32, 40, 64, 72, 80, 128, 160, 256):
        for nq in (77, 256, 4096):
            cfg = launch_config(nq, 77, d, dtype, "cuda")
            if cfg["block_m"] >= 64:
                assert cfg["block_m"] // (cfg["num_warps"] // 4) >= 64, (d, nq, cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_default_output_and_scale(dtype):
    q, k, v = make_qkv(2, 2, 9, 77, 40, dtype, "contiguous")
    for scale in (0.0, -0.7):  # a zero scale (uniform weights, masked keys still excluded), a negative one
        assert_close(attention(q, k, v, scale=scale), reference(q, k, v, scale=scale), dtype)
    o = attention(q, k, v, scale=0.3)
    assert o.shape == q.shape and o.dtype == dtype
    assert o.transpose(1, 2).is_contiguous()  # stored (B, N, H, D): merging the heads next is a view
    assert_close(o, reference(q, k, v, scale=0.3), dtype)


def test_attention_large_logits_stay_finite():
    """Logits in the thousands: the running-max online softmax must not overflow."""
    q, k, v = make_qkv(1, 1, 20, 150, 32, torch.float32, "contiguous")
    o = attention(q * 30, k * 30, v)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), reference(q * 30, k * 30, v), rtol=1e-4, atol=1e-4)


def test_attention_layer_triton_equals_native():
    from fastdiff.models.layers import Attention

    layer = Attention()
    q, k, v = make_qkv(1, 2, 13, 77, 40, torch.float32, "strided")
    native = layer.forward_native(q, k, v, scale=0.2)
    layer.set_backend("triton")
    torch.testing.assert_close(layer(q, k, v, scale=0.2), native, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "triton_tma"])
def test_heads_wider_than_the_kernel_run_on_sdpa(backend):
    """A VAE's mid-block attention (one head of 512 channels) on the Triton backends: SDPA, not an error."""
    from fastdiff.models.layers import set_backend
    from fastdiff.models.unet import SpatialSelfAttention

    torch.manual_seed(0)
    layer = SpatialSelfAttention(320, 1, 320, 32, 1e-6).eval()
    x = torch.randn(1, 320, 3, 5)
    with torch.no_grad():
        want = layer(x)
        set_backend(layer, "triton", ops={"attention": backend})
        assert layer.core.backend == backend
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_attention_layer_runs_a_pinned_sdpa_kernel():
    """kernel_ops {"attention": "sdpa_flash"}: SDPA pinned to one kernel (torch has a CPU flash kernel); a
    kernel that cannot run the problem says which and why."""
    from fastdiff.errors import BackendUnavailableError
    from fastdiff.models.layers import Attention

    layer = Attention()
    q, k, v = make_qkv(1, 2, 13, 77, 40, torch.float32, "contiguous")  # torch's CPU flash kernel wants these
    native = layer.forward_native(q, k, v, scale=0.2)
    layer.set_backend("sdpa_flash")
    torch.testing.assert_close(layer(q, k, v, scale=0.2), native, rtol=1e-5, atol=1e-5)
    layer.set_backend("sdpa_cudnn")  # cuDNN attention is CUDA-only
    with pytest.raises(BackendUnavailableError, match="'cudnn' cannot run attention of shape"):
        layer(q, k, v, scale=0.2)


def test_tuning_times_sdpa_kernels_on_a_gpu_only():
    """"tune" also times SDPA pinned to each of its kernels, on CUDA inputs and unless a backend is pinned."""
    from types import SimpleNamespace

    from fastdiff.models.layers import Attention

    layer = Attention()
    every = ["triton", "native", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]
    on_gpu = (SimpleNamespace(device=torch.device("cuda")),)
    assert layer.tune_candidates(every, on_gpu, {}) == every
    assert layer.tune_candidates(every, (torch.randn(1, 1, 2, 8),), {}) == ["triton", "native"]
    layer.sdpa_backend = "flash"  # OptimizeConfig(sdpa_backend="flash"): "native" is that kernel already
    assert layer.tune_candidates(every, on_gpu, {}) == ["triton", "native"]
    # the TMA kernel is timed where it runs (here: the interpreter's descriptors, triton >= 3.4), not where it
    # would fall back
    q = torch.randn(1, 1, 4, 16)
    has_tma = importlib.import_module("fastdiff.kernels.attention_tma")._descriptor_class() is not None
    assert ("triton_tma" in layer.tune_candidates(every + ["triton_tma"], (q, q, q), {})) == has_tma
    assert "triton_tma" not in layer.tune_candidates(every + ["triton_tma"], (q, q[..., ::2], q), {})


@pytest.mark.parametrize("call,match", [
    (lambda: attention(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)), r"\(B, H, N, D\)"),
    (lambda: attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)),
     r"k of shape \(1, 2, Nk, 8\)"),
    (lambda: attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 7, 8)), "v of shape"),
    (lambda: attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8).half(), torch.randn(1, 2, 6, 8).half()),
     "one dtype"),
    (lambda: attention(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 0, 8), torch.randn(1, 1, 0, 8)), "Nk = 0"),
    (lambda: attention(torch.randn(1, 1, 5, 300), torch.randn(1, 1, 5, 300), torch.randn(1, 1, 5, 300)),
     "head dim <= 256"),
])
def test_attention_rejects_bad_arguments(call, match):
    with pytest.raises(BadArgumentError, match=match):
        call()


def test_a_strided_head_dim_is_copied_before_the_kernel(monkeypatch):
    """EDM's interleaved qkv gives q / k / v whose head dim is not the unit stride: the launcher copies them
    (each K / V tile is read once per query block, and strided reads compile to 2-byte loads), and the result
    is unchanged."""
    import importlib

    module = importlib.import_module("fastdiff.kernels.attention")
    B, H, D, N = 1, 2, 40, 9
    qkv = torch.randn(B, H, D, 3, N)  # EDM: channel (head * D + c) * 3 + {q, k, v}, positions last
    q, k, v = qkv.permute(3, 0, 1, 4, 2).unbind(0)  # 3 x (B, H, N, D), head-dim stride 3 * N
    assert q.stride(3) == 3 * N
    seen = []
    original = module._launches
    monkeypatch.setattr(module, "_launches", lambda q, k, v, *a, **kw: seen.append((q, k, v)) or original(q, k, v, *a,
                                                                                                         **kw))
    out = attention(q, k, v)
    assert [t.stride(3) for t in seen[0]] == [1, 1, 1]
    assert_close(out, reference(q, k, v), torch.float32)
    contiguous_k = torch.randn(B, H, N, D)  # already unit-stride: passed through, no copy
    attention(q, contiguous_k, contiguous_k)
    assert seen[1][1] is contiguous_k
