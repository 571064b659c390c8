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


class _Recorder:
    """Stand-ins for torch.cuda's stream, graph and event calls (none exist in the CPU build), recording which
    stream each warm-up and capture ran on."""

    def __init__(self, monkeypatch):
        import contextlib

        self.used = []
        self.side = FakeStream(device=0)
        recorder = self

        class Stream:
            def wait_stream(self, other):
                pass

        class Graph:
            def pool(self):
                return None

            def replay(self):
                pass

        class Event:
            def __init__(self, **_):
                pass

            def record(self):
                pass

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return 1.0

        @contextlib.contextmanager
        def on(stream):
            recorder.used.append(("warm-up", stream))
            yield

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None, capture_error_mode=None):
            recorder.used.append(("capture", stream))
            yield

        self.side.wait_stream = lambda other: None
        for name, value in (("current_stream", lambda *a: Stream()), ("stream", on), ("graph", graph),
                            ("CUDAGraph", Graph), ("graph_pool_handle", lambda: 0), ("Event", Event),
                            ("device", lambda d: contextlib.nullcontext())):
            monkeypatch.setattr(torch.cuda, name, value, raising=False)
        monkeypatch.setattr(cuda_streams, "_streams", {0: self.side})
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        from fastdiff.models import op_tuning

        monkeypatch.setattr(op_tuning, "_pool", [])  # (the stand-in pool handle must not outlive the test)


def test_graph_captures_and_tuning_graphs_warm_up_and_capture_on_the_side_stream(monkeypatch):
    from fastdiff.models import op_tuning
    from fastdiff.runtime.graphs import CudaGraph

    rec = _Recorder(monkeypatch)
    CudaGraph(lambda x: x + 1, [torch.ones(2)])
    op_tuning.graph_device_time(lambda: None)
    assert rec.used == [("warm-up", rec.side), ("capture", rec.side)] * 2


def test_a_capture_and_a_tuning_measurement_in_two_threads_do_not_wait_on_each_other(monkeypatch):
    """A graph capture whose warm-up meets a new problem takes the capture lock, then op_tuning's; a measurement in
    another thread must take them in that order too (it took op_tuning's first: each thread held one lock and
    waited for the other's, for ever)."""
    import threading

    from fastdiff.models import op_tuning
    from fastdiff.models.layers import Attention
    from fastdiff.runtime.graphs import CudaGraph

    _Recorder(monkeypatch)
    op_tuning.clear()
    # (locks of this test's own: threads stuck on them, were the order wrong again, would hold nothing later tests use)
    capture_lock = threading.RLock()
    from fastdiff.runtime import graphs

    for module, name in ((graphs, "CAPTURE_LOCK"), (op_tuning, "CAPTURE_LOCK"), (cuda_streams, "CAPTURE_LOCK")):
        monkeypatch.setattr(module, name, capture_lock)
    monkeypatch.setattr(op_tuning, "_lock", threading.RLock())
    a_in, b_in = threading.Event(), threading.Event()

    def timer(fn, backend, module):
        if threading.current_thread().name == "measure":  # (holding what choose takes, until the capture began)
            b_in.set()
            a_in.wait(2)
        return op_tuning.graph_device_time(fn)

    monkeypatch.setattr(op_tuning, "TIMER", timer)
    layers = [Attention(), Attention()]
    for layer in layers:
        layer.set_backend("tune")
    qa, qb = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 9, 16)

    def warm_up(x):  # a graphed network's warm-up meeting a new attention problem
        a_in.set()
        b_in.wait(2)
        return layers[0](x, x, x)

    threads = [threading.Thread(name="capture", target=lambda: CudaGraph(warm_up, [qa]), daemon=True),
               threading.Thread(name="measure", target=lambda: layers[1](qb, qb, qb), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    stuck = any(t.is_alive() for t in threads)
    if not stuck:
        op_tuning.clear()
    assert not stuck, "the two threads wait on each other"
