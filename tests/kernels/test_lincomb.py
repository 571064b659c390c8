"""fastdiff.kernels.lincomb (the samplers' fused state update) vs a float64 reference, through the interpreter."""

import pytest
import torch

from fastdiff.errors import BadArgumentError
from fastdiff.kernels import lincomb

TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
COEFS = (0.83, -1.7, 0.45, -0.12, 2.5)


def reference(terms):
    return sum(c * t.double() for c, t in terms)


@pytest.mark.parametrize("n_terms", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (1025,), (2, 4, 5, 7)], ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_lincomb_matches_reference(n_terms, shape, dtype):
    terms = [(c, (torch.randn(shape) * 3 + 1).to(dtype)) for c in COEFS[:n_terms]]
    out = torch.full(shape, float("nan"), dtype=dtype)
    y = lincomb(terms, out=out)
    assert y is out and y.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), reference(terms), rtol=rtol, atol=atol)


def test_lincomb_new_tensor_and_in_place_and_strided():
    x = torch.randn(3, 4, 5)
    x0 = torch.randn(3, 4, 5).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous: read by value
    ref = reference([(0.5, x), (2.0, x0)])
    y = lincomb([(0.5, x), (2.0, x0)])
    assert y is not x and y.is_contiguous()
    torch.testing.assert_close(y.double(), ref)
    assert lincomb([(0.5, x), (2.0, x0)], out=x) is x  # out aliasing an input: each element read first
    torch.testing.assert_close(x.double(), ref)


def test_lincomb_keeps_a_shared_dense_layout():
    """All channels-last: read as flat buffers (no copies) and a channels-last result; mixed: copied first."""
    a, b = (torch.randn(2, 5, 3, 4).to(memory_format=torch.channels_last) for _ in range(2))
    y = lincomb([(0.5, a), (-2.0, b)])
    assert y.stride() == a.stride()
    torch.testing.assert_close(y.double(), reference([(0.5, a), (-2.0, b)]))
    mixed = lincomb([(0.5, a), (-2.0, b.contiguous())])
    assert mixed.is_contiguous()
    torch.testing.assert_close(mixed.double(), reference([(0.5, a), (-2.0, b)]))


@pytest.mark.parametrize("terms,match", [
    ([], "1 to 5"),
    ([(1.0, torch.ones(3))] * 6, "1 to 5"),
    ([(1.0, torch.ones(3)), (1.0, torch.ones(4))], "term 1 of shape"),
    ([(1.0, torch.ones(3)), (1.0, torch.ones(3, dtype=torch.float16))], "term 1 of shape"),
    ([(1.0, torch.ones(3, dtype=torch.float64))], "dtype"),
    ([torch.ones(3)], "term 0 as"),
])
def test_lincomb_rejects_bad_terms(terms, match):
    with pytest.raises(BadArgumentError, match=match):
        lincomb(terms)
