"""fastdiff.kernels.attention_tma (TMA tensor descriptors, Hopper+) vs float64 SDPA, on the CPU through Triton's
interpreter, which implements the descriptors' bounds: zero-filled loads past Nq / Nk / D, clipped stores."""

import importlib

import pytest
import torch

from fastdiff.errors import BackendUnavailableError

tma = importlib.import_module("fastdiff.kernels.attention_tma")  # the module (the package exports the launcher)

pytestmark = pytest.mark.skipif(tma._descriptor_class() is None,
                                reason="this triton has no host tensor descriptors (needs >= 3.4)")

from test_attention import TOL, assert_close, reference  # noqa: E402


def make_qkv(B, H, NQ, NK, D, dtype, layout):
    """Non-zero-mean q, k, v; "strided": (B, N, H, D) memory viewed as (B, H, N, D), as the models' projections
    give them (the head dim stays unit-stride: what TMA needs)."""
    def one(n, shift):
        if layout == "strided":
            return (torch.randn(B, n, H, D) + shift).to(dtype).transpose(1, 2)
        return (torch.randn(B, H, n, D) + shift).to(dtype)

    return one(NQ, 0.5), one(NK, -0.3), one(NK, 1.0)

SHAPES = [  # (B, H, Nq, Nk, D): every model head dim whose rows are 16-byte multiples in half precision
    (1, 2, 77, 77, 40),  # SD1.5: D=40 read as a 64-wide tile, 77 tokens off the block size
    (2, 1, 5, 77, 72),  # DiT's D=72 as 128, cross attention over 77 tokens
    (1, 1, 16, 16, 64),
    (1, 2, 33, 20, 80),
    (1, 1, 7, 40, 128),
]


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}H{h}q{q}k{k}d{d}" for b, h, q, k, d in SHAPES])
def test_attention_tma_matches_sdpa(shape, dtype, layout):
    q, k, v = make_qkv(*shape, dtype, layout)
    out = torch.full(q.shape, float("nan"), dtype=dtype)  # poisoned: every element must be written
    o = tma.attention_tma(q, k, v, out=out)
    assert o is out
    assert_close(o, reference(q, k, v), dtype)


def test_attention_tma_pads_nothing_into_a_wider_buffer():
    """A D=40 output viewed in a 64-wide buffer: the clipped store leaves columns 40.. untouched."""
    q, k, v = make_qkv(1, 2, 9, 13, 40, torch.float16, "contiguous")
    buf = torch.full((1, 2, 9, 64), 7.0, dtype=torch.float16)
    o = tma.attention_tma(q, k, v, out=buf[..., :40])
    assert_close(o, reference(q, k, v), torch.float16)
    assert (buf[..., 40:] == 7.0).all()


def test_attention_tma_scale_and_projection_views():
    """q, k, v as views of one (B, N, 3, H, D) projection (a DiT's qkv), a custom and a negative scale."""
    qkv = torch.randn(2, 20, 3, 2, 72).half()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    for scale in (0.3, -0.2):
        assert_close(tma.attention_tma(q, k, v, scale=scale), reference(q, k, v, scale=scale), torch.float16)


def test_unsupported_layouts_are_refused_with_the_reason():
    q, k, v = make_qkv(1, 2, 8, 8, 36, torch.float16, "contiguous")  # heads of 72 bytes: not 16-byte multiples
    ok, why = tma.supported(q, k, v)
    assert not ok and "16-byte" in why
    with pytest.raises(BackendUnavailableError, match="16-byte"):
        tma.attention_tma(q, k, v)
    q, k, v = make_qkv(1, 1, 8, 8, 64, torch.float16, "contiguous")
    assert tma.supported(q, k, v) == (True, "ok")
    assert not tma.supported(q[..., ::2], k[..., ::2], v[..., ::2])[0]  # head dim not unit-stride
    wide = make_qkv(1, 1, 8, 8, 160, torch.float16, "contiguous")  # no autotuner tile fits a 256-wide head
    assert "head dim 160" in tma.supported(*wide)[1]
    shared = torch.randn(1, 8, 1, 64).half().expand(2, 8, 8, 64)  # a zero stride: not a TMA layout
    assert not tma.supported(shared, shared, shared)[0]


def test_keys_past_the_end_never_set_the_running_maximum():
    """Keys past Nk are read as zeros, so their scores are 0. With every real score far below 0, a 0 taken as
    the running maximum would underflow every real probability to 0 (a NaN output): they must be masked."""
    q = torch.full((1, 1, 9, 40), -30.0) + torch.rand(1, 1, 9, 40)
    k = torch.ones(1, 1, 13, 40) + torch.rand(1, 1, 13, 40) * 0.1
    v = torch.randn(1, 1, 13, 40)
    o = tma.attention_tma(q, k, v)
    assert torch.isfinite(o).all()  # scores near -190 after scaling: float32 keeps ~1e-4 of them
    torch.testing.assert_close(o.double(), reference(q, k, v), rtol=1e-3, atol=1e-3)


def test_model_level_triton_tma_equals_eager():
    """kernel_ops={"attention": "triton_tma"}: a text UNet's self and cross attention through the descriptors
    (its layouts qualify, so no call falls back to the pointer kernel), equal to eager sampling."""
    from unittest import mock

    import fastdiff

    kw = dict(seeds=[4, 5], steps=2, sampler="dpmpp_2m", encoder_hidden_states=torch.randn(1, 6, 32),
              negative_encoder_hidden_states=torch.zeros(1, 6, 32), cfg_scale=4.0, progress=False)
    want = fastdiff.load("arch:tiny-sd-unet").generate(**kw)
    pipe = fastdiff.load("arch:tiny-sd-unet").optimize(backend="triton", kernel_ops={"attention": "triton_tma"})
    pointer = importlib.import_module("fastdiff.kernels.attention")
    with mock.patch.object(tma, "_launches", wraps=tma._launches) as spy, \
            mock.patch.object(pointer, "_launches", wraps=pointer._launches) as fallback:
        got = pipe.generate(**kw)
    assert spy.call_count > 0 and fallback.call_count == 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_failing_tma_launch_leaves_the_layer_on_the_pointer_kernel(monkeypatch):
    from fastdiff.models.layers import Attention

    q, k, v = make_qkv(1, 2, 9, 13, 40, torch.float32, "contiguous")
    layer = Attention()
    layer.set_backend("triton_tma")

    def broken(*a, **kw):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(tma, "_launches", broken)
    with pytest.warns(UserWarning, match="pointer kernel from now on"):
        out = layer(q, k, v)
    assert_close(out, reference(q, k, v), torch.float32)
    out = layer(q, k, v)  # no second warning, no second try
    assert layer._tma_failed


def test_supported_checks_the_output_it_allocates_itself():
    """q, k, v views of a wider buffer pass TMA's checks, and the (B, Nq, H, D) output the launcher allocates would
    not: supported() says so, and the layer falls back without a warning or a 'failed' mark (a review)."""
    big = torch.randn(3, 1, 2, 8, 64).half()
    q, k, v = big[0, ..., :36], big[1, ..., :36], big[2, ..., :36]
    ok, why = tma.supported(q, k, v)
    assert not ok and "out: the output's rows of 36" in why


def test_the_interpreter_upcasts_bfloat16_dots_of_cuda_tensors_too():
    """Under TRITON_INTERPRET=1 a CUDA tensor is interpreted too, and the interpreter's bfloat16 dot is wrong without
    the upcast (max error 8e8 before: a review); the AOT check still compiles the GPU kernel (no upcast)."""
    pointer = importlib.import_module("fastdiff.kernels.attention")  # (the module, not the launcher)

    q, k, v = make_qkv(1, 1, 16, 16, 64, torch.bfloat16, "contiguous")
    out = torch.empty_like(q)
    for launches in (pointer._launches, tma._launches):
        assert launches(q, k, v, out, None, "cuda")[0][2]["DOT_FP32"]
        assert not launches(q, k, v, out, None, "cuda", interpret=False)[0][2]["DOT_FP32"]
