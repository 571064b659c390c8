"""Test-wide setup.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so the kernels run on the
CPU through Triton's interpreter.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests use tiny tensors: one intra-op thread is faster (no thread hand-off) and matches how the
# reference fixtures were made (torch.set_num_threads(1)).
torch.set_num_threads(1)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
FIXTURES = os.path.abspath(os.environ.get("FASTDIFF_FIXTURES", os.path.join(SHARED, "fixtures")))


def fixture_path(*parts: str) -> str:
    """Path under ../shared/fixtures; skips the test (with the reason) when that folder is absent."""
    p = os.path.join(FIXTURES, *parts)
    if not os.path.exists(p):
        pytest.skip(f"reference fixture {p} not present (set FASTDIFF_FIXTURES)")
    return p


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one intra-op thread, whatever an earlier test (a bench's ``--threads``) set:
    small CPU tensors gain nothing from more, and on a loaded machine they thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
