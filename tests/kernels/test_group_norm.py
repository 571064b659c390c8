"""fastdiff.kernels.group_norm vs a float64 torch reference, on the CPU through Triton's interpreter."""

import pytest
import torch
import torch.nn.functional as F

from fastdiff.errors import BadArgumentError
from fastdiff.kernels import group_norm

# (rtol, atol) against a float64 reference computed from the same (rounded) inputs: only the kernel's
# float32 arithmetic and the final rounding to the output dtype remain.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = list(TOL)


def reference(x, G, weight=None, bias=None, eps=1e-5, activation=None, scale=None, shift=None, pre_bias=None):
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    xd = x.double() if pre_bias is None else x.double() + pre_bias.double().reshape(view)
    h = F.group_norm(xd, G, None if weight is None else weight.double(),
                     None if bias is None else bias.double(), eps)
    if scale is not None:
        h = h * (1 + scale.double().reshape(view))
    if shift is not None:
        h = h + shift.double().reshape(view)
    return F.silu(h) if activation == "silu" else h


def make_input(shape, dtype, layout, mean=3.0, std=2.0):
    """Non-zero-mean random input in the requested memory layout (values rounded to dtype)."""
    if layout == "channels_last":
        # (B, *spatial, C) memory viewed as (B, C, *spatial)
        perm = (0, len(shape) - 1) + tuple(range(1, len(shape) - 1))
        mem = torch.randn((shape[0],) + tuple(shape[2:]) + (shape[1],)) * std + mean
        x = mem.to(dtype).permute(perm)
        assert x.shape == shape and x.stride(1) == 1
        return x
    return (torch.randn(shape) * std + mean).to(dtype)


def poisoned_like(x):
    return torch.full_like(x, float("nan"))  # full_like keeps x's memory format


def assert_close(y, ref, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)


SHAPES = [  # (shape, groups): odd channel / spatial counts, 3-D (B, C, N) inputs, 1 and many channels per group
    ((2, 12, 5, 7), 4),
    ((1, 10, 7, 7), 5),
    ((1, 64, 3, 3), 2),
    ((2, 6, 77), 3),
    ((1, 7, 123), 7),
]


@pytest.mark.parametrize("strategy", [None, "rows"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "affine+scaleshift+silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", SHAPES, ids=[f"{s}g{g}" for s, g in SHAPES])
def test_group_norm_matches_reference(shape, groups, dtype, layout, fused, strategy):
    x = make_input(shape, dtype, layout)
    B, C = shape[:2]
    kw = {}
    if fused:
        kw = dict(weight=torch.randn(C) * 0.5 + 1, bias=torch.randn(C), activation="silu",
                  scale=(torch.randn(B, C) * 0.5).to(dtype), shift=torch.randn(B, C).to(dtype))
    out = poisoned_like(x)
    y = group_norm(x, groups, eps=1e-5, out=out, strategy=strategy, **kw)
    assert y is out
    assert_close(y, reference(x, groups, eps=1e-5, **kw), dtype)


@pytest.mark.parametrize("num_splits", [2, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_split_statistics(num_splits, dtype, layout):
    """The two-launch path (partial statistics per slice, merged per group) equals the reference."""
    x = make_input((2, 6, 5, 9), dtype, layout)
    w, b = torch.randn(6), torch.randn(6)
    out = poisoned_like(x)
    y = group_norm(x, 3, w, b, activation="silu", out=out, num_splits=num_splits)
    assert_close(y, reference(x, 3, w, b, activation="silu"), dtype)


@pytest.mark.parametrize("strategy", [None, "rows"])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_pre_bias(dtype, layout, num_splits, strategy):
    """GroupNorm of x + pre_bias (a resnet's time embedding): statistics of the sum, in one pass."""
    x = make_input((2, 12, 5, 7), dtype, layout)
    pre = (torch.randn(2, 12) * 3).to(dtype)
    kw = dict(weight=torch.randn(12), bias=torch.randn(12), scale=torch.randn(2, 12).to(dtype), activation="silu")
    out = poisoned_like(x)
    y = group_norm(x, 4, out=out, pre_bias=pre, num_splits=num_splits, strategy=strategy, **kw)
    assert_close(y, reference(x, 4, pre_bias=pre, **kw), dtype)


@pytest.mark.parametrize("strategy", [None, "rows"])
@pytest.mark.parametrize("num_splits", [None, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_group_norm_reads_strided_per_sample_vectors(dtype, layout, num_splits, strategy):
    """scale / shift as the two halves of one (B, 2C) projection and pre_bias as a slice of a wider stacked one
    (rows strided by the whole width, a UNet's fuse_conditioning) are read in place, each row from its own
    start, and give what contiguous copies give. An expanded (row stride 0) scale shares one row."""
    x = make_input((3, 12, 5, 7), dtype, layout)
    proj = (torch.randn(3, 2 * 12) * 0.5).to(dtype)  # a scale-shift resnet's projection
    stacked = (torch.randn(3, 40) * 3).to(dtype)  # several layers' projections side by side
    scale, shift, pre = proj[:, :12], proj[:, 12:], stacked[:, 17:29]
    assert scale.stride() == (24, 1) and pre.stride() == (40, 1)
    kw = dict(weight=torch.randn(12), bias=torch.randn(12), activation="silu")
    y = group_norm(x, 4, out=poisoned_like(x), scale=scale, shift=shift, pre_bias=pre, num_splits=num_splits,
                   strategy=strategy, **kw)
    assert_close(y, reference(x, 4, scale=scale, shift=shift, pre_bias=pre, **kw), dtype)
    if strategy is None:  # no copies: the launch reads the views themselves
        from fastdiff.kernels.group_norm import _vectors

        views = _vectors(x, None, None, scale, shift, pre)[2:]
        assert [v.data_ptr() for v in views] == [scale.data_ptr(), shift.data_ptr(), pre.data_ptr()]
    shared = torch.randn(1, 12).to(dtype).expand(3, 12)
    y = group_norm(x, 4, out=poisoned_like(x), scale=shared, num_splits=num_splits, strategy=strategy)
    assert_close(y, reference(x, 4, scale=shared), dtype)


def test_group_norm_rejects_a_bad_pre_bias():
    with pytest.raises(BadArgumentError, match="pre_bias"):
        group_norm(torch.randn(2, 4, 3, 3), 2, pre_bias=torch.randn(4))


@pytest.mark.parametrize("strategy", [None, "rows"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("tile,num_warps", [(16, 1), (64, 2), (32, 8)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_tuning_overrides(tile, num_warps, num_splits, layout, strategy):
    """Small tiles: many tiles per slice, each with masked rows (5 channels per group in an 8-row tile) and a
    ragged last column block; every tile's element count must be right for the merged statistics. For
    "rows": many row tiles per slice, and several slices per channel merged by the coefficient kernel."""
    x = make_input((2, 10, 5, 7), torch.float32, layout)
    w, b = torch.randn(10), torch.randn(10)
    out = poisoned_like(x)
    y = group_norm(x, 2, w, b, activation="silu", out=out, num_splits=num_splits, tile=tile, num_warps=num_warps,
                   strategy=strategy)
    assert_close(y, reference(x, 2, w, b, activation="silu"), torch.float32)


@pytest.mark.parametrize("tile", [8, 4096])  # 8: a channels-last row of 24 channels spans 3 channel blocks
@pytest.mark.parametrize("out_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_rows_writes_any_out_layout(layout, out_layout, tile):
    x = make_input((2, 24, 6, 5), torch.float16, layout)
    scale, shift = torch.randn(2, 24).half(), torch.randn(2, 24).half()
    out = poisoned_like(make_input((2, 24, 6, 5), torch.float16, out_layout))
    y = group_norm(x, 4, scale=scale, shift=shift, activation="silu", out=out, strategy="rows", tile=tile,
                   num_splits=4)
    assert y is out and y.stride() == out.stride()
    assert_close(y, reference(x, 4, scale=scale, shift=shift, activation="silu"), torch.float16)


def test_group_norm_rejects_unknown_strategy():
    with pytest.raises(BadArgumentError, match="strategy"):
        group_norm(torch.randn(1, 4, 3, 3), 2, strategy="cols")


@pytest.mark.parametrize("strategy", [None, "rows"])
@pytest.mark.parametrize("kw,match", [(dict(tile=48), "power of two"), (dict(tile=0), "power of two"),
                                      (dict(tile=-8), "power of two"), (dict(num_warps=3), "num_warps")])
def test_group_norm_rejects_bad_tuning(kw, match, strategy):
    with pytest.raises(BadArgumentError, match=match):
        group_norm(torch.randn(1, 4, 3, 3), 2, strategy=strategy, **kw)


@pytest.mark.parametrize("strategy", [None, "rows"])
@pytest.mark.parametrize("shape,groups", [((3, 8), 8), ((2, 6, 1, 1), 6), ((2, 1, 5, 3), 1), ((1, 4, 1, 7), 2)])
def test_group_norm_degenerate_sizes(shape, groups, strategy):
    """No spatial dims, one position, one channel, one channel per group."""
    x = torch.randn(shape) * 2 + 1
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    out = poisoned_like(x)
    y = group_norm(x, groups, w, b, activation="silu", out=out, strategy=strategy)
    assert_close(y, reference(x, groups, w, b, activation="silu"), torch.float32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_keeps_memory_format_and_dtype(layout, dtype):
    x = make_input((2, 8, 3, 5), dtype, layout)
    y = group_norm(x, 4, activation="silu")
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert_close(y, reference(x, 4, activation="silu"), dtype)


@pytest.mark.parametrize("strategy", [None, "rows"])
@pytest.mark.parametrize("num_splits", [None, 4, 1000])  # 1000: more than HW, clamped to one position per slice
def test_group_norm_large_mean_is_stable(num_splits, strategy):
    """|mean| >> std: E[x^2] - E[x]^2 in float32 would lose every digit; tile-wise M2 merging does not."""
    x = torch.randn(1, 4, 4, 5) + 1e4
    y = group_norm(x, 2, num_splits=num_splits, strategy=strategy)
    ref = reference(x, 2)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=5e-3)


def test_group_norm_strided_input_is_copied():
    """Spatial dims that do not flatten to one stride (a slice) take the contiguous-copy path."""
    base = torch.randn(1, 6, 8, 9) + 1
    x = base[:, :, ::2, 1:8]
    out = torch.full((1, 6, 4, 7), float("nan"))
    y = group_norm(x, 3, out=out)
    assert y is out
    assert_close(y, reference(x, 3), torch.float32)


def test_group_norm_scale_shift_accepts_broadcast_shape():
    """scale / shift as (B, C, 1, 1) (what a UNet's emb projection gives) are accepted."""
    x = make_input((2, 4, 3, 3), torch.float32, "contiguous")
    sc, sh = torch.randn(2, 4, 1, 1), torch.randn(2, 4, 1, 1)
    y = group_norm(x, 2, scale=sc, shift=sh)
    assert_close(y, reference(x, 2, scale=sc, shift=sh), torch.float32)


def test_group_norm_layer_triton_equals_native():
    """models.layers.GroupNorm calls the launcher with the argument order it expects."""
    from fastdiff.models.layers import GroupNorm

    layer = GroupNorm(4, 8, activation="silu")
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = make_input((2, 8, 3, 5), torch.float32, "channels_last")
    sc, sh = torch.randn(2, 8), torch.randn(2, 8)
    native = layer.forward_native(x, sc, sh)
    layer.set_backend("triton")
    torch.testing.assert_close(layer(x, sc, sh), native, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: group_norm(torch.randn(2, 6, 4), 4), "divisible"),
    (lambda: group_norm(torch.randn(2, 6, 4), 3, activation="gelu"), "activation"),
    (lambda: group_norm(torch.randn(2, 6, 4), 3, weight=torch.ones(5)), r"weight of shape \(6,\)"),
    (lambda: group_norm(torch.randn(2, 6, 4), 3, scale=torch.ones(2, 5)), r"scale of shape \(2, 6\)"),
    (lambda: group_norm(torch.randn(2, 6, 4).long(), 3), "dtype"),
    (lambda: group_norm(torch.randn(6), 3), r"\(B, C, \*spatial\)"),
    (lambda: group_norm(torch.randn(2, 6, 4), 3, out=torch.empty(2, 6, 5)), "out of shape"),
])
def test_group_norm_rejects_bad_arguments(call, match):
    with pytest.raises(BadArgumentError, match=match):
        call()


def test_kernels_package_imports_without_triton():
    """``import fastdiff.kernels`` works where triton is missing; calling a kernel says what is missing."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fastdiff.kernels as k\n"
            "from fastdiff.errors import BackendUnavailableError\n"
            "try:\n    k.group_norm(torch.zeros(1, 2, 3), 1)\n"
            "except BackendUnavailableError as e:\n    print('raised:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "raised:" in r.stdout and "needs Triton" in r.stdout


def test_native_half_group_norm_makes_no_float32_copies():
    """The native path of a half-precision GroupNorm(+SiLU) runs on the input dtype (torch keeps float32
    statistics itself): no cast kernels, and the result still matches a float32 reference."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from fastdiff.models.layers import GroupNorm

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    layer = GroupNorm(4, 12, activation="silu")
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 12, 5, 7) * 3 + 2
    want = F.silu(F.group_norm(x, 4, layer.weight, layer.bias, 1e-5))
    layer, xh = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    counter = Count()
    with counter, torch.no_grad():
        got = layer(xh)
    assert got.dtype == torch.bfloat16
    assert "aten._to_copy.default" not in counter.ops, counter.ops
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=3e-2)
