"""fastdiff.kernels launchers run on their input's GPU, not on whichever GPU is current (Triton launches on the
current device). Checked on the CPU with a stand-in for CUDA: which device context each call entered."""

import contextlib

import pytest
import torch

import fastdiff.kernels as kernels


class _OnGpu1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1."""

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 1


@pytest.fixture
def entered(monkeypatch):
    seen = []

    @contextlib.contextmanager
    def device(d):
        seen.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    return seen


def test_a_launch_on_another_gpu_enters_that_device(entered):
    x = torch.randn(3).as_subclass(_OnGpu1)
    calls = []
    wrapped = kernels._on_input_device(lambda *a, **k: calls.append((a, k)) or "done")
    assert wrapped(x, 2, eps=1.0) == "done"
    assert len(entered) == 1 and calls == [((x, 2), {"eps": 1.0})]
    assert wrapped([(0.5, x), (2.0, x)]) == "done" and len(entered) == 2  # lincomb's (coef, tensor) terms


def test_a_launch_on_the_current_device_or_the_cpu_enters_nothing(entered):
    wrapped = kernels._on_input_device(lambda *a, **k: "done")
    assert wrapped(torch.randn(3)) == "done" and wrapped([(1.0, torch.randn(2))]) == "done"
    assert wrapped("not a tensor") == "done" and wrapped() == "done"
    assert entered == []


def test_the_public_launchers_are_wrapped():
    """Every launcher resolves through the guard (its __wrapped__ is the module's function)."""
    for name in kernels._LAUNCHERS:
        fn = kernels._load(name)
        assert getattr(fn, "__wrapped__", None) is not None, name
