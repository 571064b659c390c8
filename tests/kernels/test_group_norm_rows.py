"""The "rows" GroupNorm strategy's launcher logic (its numerics are in test_group_norm.py, strategy="rows")."""

import pytest
import torch

from fastdiff.kernels.group_norm_rows import _channel_tile, launch_config, launches, rows_view


@pytest.mark.parametrize("C,tile,want", [(320, 4096, 64), (640, 4096, 128), (1280, 4096, 256), (24, 4096, 32),
                                         (64, 4096, 64), (320, 32, 32), (7, 4096, 8)])
def test_channel_tile_divides_c_without_masked_lanes(C, tile, want):
    assert _channel_tile(C, tile) == want


def test_rows_view_reads_the_contiguous_axis():
    x = torch.empty(2, 6, 4, 5)
    assert rows_view(x, 1) == (0, 6, 20, 20)  # NCHW: rows are channels
    cl = x.to(memory_format=torch.channels_last)
    assert rows_view(cl, 6) == (1, 20, 6, 6)  # channels-last: rows are positions
    assert rows_view(x[:, :, :, ::2], 2) is None  # neither axis contiguous


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_growing_grid_axes_are_axis_0(layout):
    """CUDA caps grid axes 1 and 2 at 65535: the axis that grows with the image must be axis 0."""
    x = torch.empty(1, 128, 2048, 2048, device="meta")  # a VAE decoder's activation at 2048 px
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    stride = 1 if layout == "nchw" else 128
    w = torch.empty(128, device="meta")
    for kernel, grid, args, meta in launches(x, torch.empty_like(x), 32, w, w, None, None, 1e-5, "silu", stride,
                                             stride, num_splits=10**6):
        assert all(g <= 65535 for g in grid[1:]), (kernel, grid)


def test_interpreter_uses_one_slice_per_channel_block():
    assert launch_config((1, 8, 128, 128), 4, 0, device_type="cpu")["num_splits"] == 1
    assert launch_config((1, 8, 128, 128), 4, 0, device_type="cuda")["num_splits"] == 4  # 16384 positions
