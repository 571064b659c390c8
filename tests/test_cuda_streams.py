"""fastdiff's one side stream per CUDA device (``fastdiff.utils.cuda_streams``), with a stand-in stream class: the
CPU build of torch has no CUDA streams. Why it matters (each stream keeps a cuBLAS workspace) is checked on a GPU in
tests/test_gpu.py::test_graph_captures_leave_no_cublas_workspace_behind."""

import threading

import pytest
import torch

from fastdiff.utils import cuda_streams


class FakeStream:
    made: list = []

    def __init__(self, device=None):
        self.device = device
        FakeStream.made.append(self)


@pytest.fixture
def fake_cuda(monkeypatch):
    FakeStream.made = []
    monkeypatch.setattr(cuda_streams, "_streams", {})
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    return FakeStream


def test_one_stream_per_device_made_once(fake_cuda):
    first = cuda_streams.side_stream()
    assert cuda_streams.side_stream() is first
    assert first.device == 1  # the current device when none is named
    assert cuda_streams.side_stream(torch.device("cuda", 1)) is first
    other = cuda_streams.side_stream("cuda:0")
    assert other is not first and other.device == 0
    assert cuda_streams.side_stream(torch.device("cuda")) is first  # "cuda" without an index: the current one
    assert len(fake_cuda.made) == 2


def test_threads_asking_at_once_get_one_stream(fake_cuda):
    got, start = [], threading.Barrier(8)

    def ask():
        start.wait()
        got.append(cuda_streams.side_stream())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(s is got[0] for s in got)
    assert len(fake_cuda.made) == 1


def test_the_capture_lock_is_reentrant():
    """Per-layer tuning captures its timing graphs from inside a model call that a capture is warming up."""
    with cuda_streams.CAPTURE_LOCK:
        assert cuda_streams.CAPTURE_LOCK.acquire(timeout=1)
        cuda_streams.CAPTURE_LOCK.release()
