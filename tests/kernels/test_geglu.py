"""fastdiff.kernels.geglu (SD's feed-forward activation) vs a float64 reference, through the interpreter."""

import pytest
import torch
import torch.nn.functional as F

from fastdiff.errors import BadArgumentError
from fastdiff.kernels import geglu

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def reference(x):
    h, gate = x.double().chunk(2, dim=-1)
    return h * F.gelu(gate)


@pytest.mark.parametrize("shape", [(2, 7, 10), (1, 77, 2 * 33), (3, 2 * 160), (1, 5, 4, 2 * 9)], ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_geglu_matches_reference(shape, dtype):
    x = (torch.randn(shape) * 2).to(dtype)
    out = torch.full(shape[:-1] + (shape[-1] // 2,), float("nan"), dtype=dtype)
    y = geglu(x, out=out)
    assert y is out
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), reference(x), rtol=rtol, atol=atol)


def test_geglu_of_a_zero_width_input_is_empty():
    """As the native op: reshape(-1, 0) raised before (a review)."""
    assert geglu(torch.randn(2, 3, 0)).shape == (2, 3, 0)


def test_geglu_reads_a_strided_input():
    x = torch.randn(2, 10, 6).transpose(0, 1)  # rows not contiguous: copied first
    torch.testing.assert_close(geglu(x).double(), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x,match", [(torch.randn(2, 5), "2 \\* inner"), (torch.randn(2, 4).long(), "dtype")])
def test_geglu_rejects_bad_input(x, match):
    with pytest.raises(BadArgumentError, match=match):
        geglu(x)
