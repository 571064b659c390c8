"""fastdiff.kernels.adaln_modulate / gated_residual vs float64 torch, on the CPU through Triton's interpreter."""

import pytest
import torch
import torch.nn.functional as F

from fastdiff.errors import BadArgumentError
from fastdiff.kernels import adaln_modulate, gated_residual, gated_residual_modulate

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = list(TOL)
SHAPES = [(2, 5, 7), (1, 77, 123), (2, 3, 1152), (3, 7, 72)]  # (B, T, D)


def ref_modulate(x, shift, scale, eps=1e-6):
    h = F.layer_norm(x.double(), (x.shape[-1],), eps=eps)
    return h * (1 + scale.double()[:, None]) + shift.double()[:, None]


def make_x(shape, dtype, layout, mean=4.0):
    B, T, D = shape
    if layout == "strided":  # tokens strided (every other row of a bigger buffer): read through strides
        return (torch.randn(B, 2 * T, D) * 2 + mean).to(dtype)[:, ::2]
    if layout == "transposed":  # last dim not unit-stride: the launcher copies
        return (torch.randn(B, D, T) * 2 + mean).to(dtype).transpose(1, 2)
    return (torch.randn(B, T, D) * 2 + mean).to(dtype)


def assert_close(o, ref, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(o.double(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_adaln_modulate_matches_reference(shape, dtype, layout):
    B, T, D = shape
    x = make_x(shape, dtype, layout)
    shift, scale = torch.randn(B, D).to(dtype), (torch.randn(B, D) * 0.5).to(dtype)
    out = torch.full((B, T, D), float("nan"), dtype=dtype)
    y = adaln_modulate(x, shift, scale, eps=1e-6, out=out)
    assert y is out
    assert_close(y, ref_modulate(x, shift, scale), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual_matches_reference(shape, dtype, layout):
    B, T, D = shape
    x, y = make_x(shape, dtype, layout), make_x(shape, dtype, "contiguous", mean=-1.0)
    gate = (torch.randn(B, D) + 0.5).to(dtype)
    out = torch.full((B, T, D), 1e4, dtype=dtype)
    o = gated_residual(x, gate, y, out=out)
    assert o is out
    assert_close(o, x.double() + gate.double()[:, None] * y.double(), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual_modulate_equals_the_two_ops(shape, dtype, layout):
    """One pass gives what gated_residual then adaln_modulate give: x' against float64, the norm of x' rounded
    to its dtype against the unfused pair; per-sample vectors as strided views of one projection."""
    B, T, D = shape
    x, y = make_x(shape, dtype, layout), make_x(shape, dtype, "contiguous", mean=-1.0)
    mod = (torch.randn(B, 3 * D) * 0.5).to(dtype)  # gate | shift | scale side by side, rows strided by 3D
    gate, shift, scale = mod[:, :D], mod[:, D:2 * D], mod[:, 2 * D:]
    x_out, out = torch.full((B, T, D), 1e4, dtype=dtype), torch.full((B, T, D), float("nan"), dtype=dtype)
    xo, h = gated_residual_modulate(x, gate, y, shift, scale, eps=1e-6, x_out=x_out, out=out)
    assert xo is x_out and h is out
    assert_close(xo, x.double() + gate.double()[:, None] * y.double(), dtype)
    torch.testing.assert_close(xo, gated_residual(x, gate, y), rtol=0, atol=0)
    torch.testing.assert_close(h, adaln_modulate(gated_residual(x, gate, y), shift, scale, eps=1e-6), rtol=0, atol=0)
    assert_close(h, ref_modulate(xo, shift, scale), dtype)


def test_gated_residual_modulate_in_place():
    x, y = make_x((2, 5, 7), torch.float32, "contiguous"), make_x((2, 5, 7), torch.float32, "contiguous")
    gate, shift, scale = torch.randn(2, 7), torch.randn(2, 7), torch.randn(2, 7)
    want = gated_residual(x, gate, y)
    xo, h = gated_residual_modulate(x, gate, y, shift, scale, x_out=x)
    assert xo is x
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    assert_close(h, ref_modulate(want, shift, scale), torch.float32)


def test_gated_residual_modulate_rejects_bad_shapes():
    x = torch.randn(2, 5, 7)
    with pytest.raises(BadArgumentError, match="shift of shape"):
        gated_residual_modulate(x, torch.randn(2, 7), x, torch.randn(2, 6), torch.randn(2, 7))
    with pytest.raises(BadArgumentError, match="y of shape"):
        gated_residual_modulate(x, torch.randn(2, 7), torch.randn(2, 4, 7), torch.randn(2, 7), torch.randn(2, 7))


def test_adaln_large_mean_row():
    x = torch.randn(1, 3, 257) + 1e3
    shift, scale = torch.randn(1, 257), torch.randn(1, 257)
    torch.testing.assert_close(adaln_modulate(x, shift, scale).double(), ref_modulate(x, shift, scale),
                               rtol=1e-3, atol=1e-3)


def test_mixed_dtypes_promote_like_torch():
    """float16 activations with float32 modulation give float32, as the native expression does."""
    x = make_x((2, 4, 24), torch.float16, "contiguous")
    shift, scale = torch.randn(2, 24), torch.randn(2, 24)
    y = adaln_modulate(x, shift, scale)
    assert y.dtype == torch.float32
    assert_close(y, ref_modulate(x, shift, scale), torch.float16)
    g = gated_residual(x, scale, x)
    assert g.dtype == torch.float32


def test_gated_residual_in_place():
    x = make_x((2, 5, 40), torch.float32, "contiguous")
    gate, y = torch.randn(2, 40), torch.randn(2, 5, 40)
    expected = x.double() + gate.double()[:, None] * y.double()
    o = gated_residual(x, gate, y, out=x)
    assert o is x
    assert_close(x, expected, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "triton_pair"])
def test_layers_triton_equal_native(backend):
    """ModulatedLayerNorm alone and with the residual before it: the one-pass kernel ("triton") and the
    residual kernel then the norm's ("triton_pair") equal torch."""
    from fastdiff.models.layers import ModulatedLayerNorm

    x, y = make_x((2, 6, 48), torch.float32, "contiguous"), torch.randn(2, 6, 48)
    shift, scale, gate = torch.randn(2, 48), torch.randn(2, 48), torch.randn(2, 48)
    layer = ModulatedLayerNorm(48)
    native, (native_x, native_h) = layer(x, shift, scale), layer(x, shift, scale, residual=(gate, y))
    torch.testing.assert_close(native_x, x + gate[:, None] * y)
    layer.set_backend(backend)
    torch.testing.assert_close(layer(x, shift, scale), native, rtol=1e-5, atol=1e-5)
    fused_x, fused_h = layer(x, shift, scale, residual=(gate, y))
    torch.testing.assert_close(fused_x, native_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_h, native_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: adaln_modulate(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)), r"\(B, T, D\)"),
    (lambda: adaln_modulate(torch.randn(2, 3, 8), torch.randn(2, 7), torch.randn(2, 8)), r"shift of shape \(2, 8\)"),
    (lambda: adaln_modulate(torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(3, 8)), r"scale of shape \(2, 8\)"),
    (lambda: gated_residual(torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 4, 8)), r"y of shape \(2, 3, 8\)"),
    (lambda: gated_residual(torch.randn(2, 3, 8).int(), torch.randn(2, 8), torch.randn(2, 3, 8)), "dtype"),
    (lambda: gated_residual(torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 3, 8),
                            out=torch.empty(2, 3, 8).half()), "out of shape"),
])
def test_adaln_rejects_bad_arguments(call, match):
    with pytest.raises(BadArgumentError, match=match):
        call()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 77, 320), (2, 3, 1280)], ids=str)
def test_residual_layer_norm_matches_torch(shape, dtype):
    """x' = x + y and the affine LayerNorm of x' in one pass, against float64 (the interpreter rounds bfloat16
    its own way, so x' is compared with tolerances, as gated_residual's is)."""
    from fastdiff.kernels import residual_layer_norm

    B, T, D = shape
    x, y = make_x(shape, dtype, "strided"), make_x(shape, dtype, "contiguous", mean=-1.0)
    w, b = (torch.randn(D) * 0.5 + 1).to(dtype), torch.randn(D).to(dtype)
    x_out, out = torch.full(shape, 1e4, dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    xo, h = residual_layer_norm(x, y, w, b, eps=1e-5, x_out=x_out, out=out)
    assert xo is x_out and h is out
    assert_close(xo, x.double() + y.double(), dtype)
    want = F.layer_norm(xo.double(), (D,), w.double(), b.double(), eps=1e-5)
    assert_close(h, want, dtype)


def test_sd_transformer_layer_norms_on_the_triton_path_equal_torch():
    """kernel_ops={"layer_norm": "triton"}: a text UNet's attention residuals added by the LayerNorm after them in
    one kernel (and the plain LayerNorms left on torch), equal to eager sampling."""
    import importlib
    from unittest import mock

    import fastdiff

    adaln = importlib.import_module("fastdiff.kernels.adaln")
    kw = dict(seeds=[4, 5], steps=2, sampler="dpmpp_2m", encoder_hidden_states=torch.randn(1, 6, 32),
              negative_encoder_hidden_states=torch.zeros(1, 6, 32), cfg_scale=4.0, progress=False)
    want = fastdiff.load("arch:tiny-sd-unet").generate(**kw)
    pipe = fastdiff.load("arch:tiny-sd-unet").optimize(backend="triton", kernel_ops={"layer_norm": "triton"})
    # (the package's launcher caches the module function: spy on what it calls)
    with mock.patch.object(adaln, "_adaln_launches", wraps=adaln._adaln_launches) as spy:
        got = pipe.generate(**kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    blocks = sum(type(m).__name__ == "TransformerBlock" for m in pipe.model.modules())
    assert spy.call_count == 2 * blocks * 2  # two per block per network call; two calls (2 steps, CFG batched)
