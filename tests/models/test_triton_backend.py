"""Model level: the fused Triton path (interpreter on CPU) equals the native path, chosen once at build."""

import pytest
import torch

import fastdiff
from fastdiff.errors import BackendUnavailableError
from fastdiff.models.layers import op_backends, set_backend
from helpers import rel_err

pytest.importorskip("triton", reason="the fused path needs triton (CPU interpreter here)")


@pytest.mark.parametrize("arch,kwargs", [
    ("tiny-unet", {}),
    ("tiny-sd-unet", {"encoder_hidden_states": torch.randn(2, 7, 32)}),
    ("tiny-dit", {"class_labels": torch.tensor([3, 10])}),
])
def test_triton_backend_equals_native(arch, kwargs):
    pipe = fastdiff.load(f"arch:{arch}")
    model = pipe.model
    c, (h, w) = pipe.spec.in_channels, pipe.spec.sample_size
    x = torch.randn(2, c, h, w)
    t = torch.tensor([17, 900])
    with torch.no_grad():
        native = model(x, t, **kwargs)
        assert set_backend(model, "triton") == "triton"
        assert set(op_backends(model).values()) == {"triton"}
        fused = model(x, t, **kwargs)
    assert rel_err(fused, native) <= 1e-4


def test_explicit_triton_without_interpreter_or_cuda_fails_loudly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = fastdiff.load("arch:tiny-unet").model
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes the triton backend available")
    with pytest.raises(BackendUnavailableError):
        set_backend(model, "triton")
    assert set_backend(model, "auto") == "native"  # automatic choice falls back quietly
