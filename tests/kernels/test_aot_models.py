"""fastdiff.kernels.aot_models: the launches recorded from the shipped models' forward passes on the meta device,
which the AOT check (test_aot.py) compiles."""

import collections
import importlib

import pytest
import torch

from fastdiff.kernels import aot, aot_models

pytest.importorskip("triton", reason="the launch helpers compute Triton launch configurations")


def test_model_launches_cover_what_the_models_run():
    """The recorded launches of the shipped models hold the configurations the listed shapes miss: SD's other
    channels per group, scale-shift norms (ADM, EDM), every head dim, the projection views' strides, batch 1."""
    sd15 = aot_models.record_model("sd15-unet", torch.float16, channels_last=True, batch=2)
    cpg = {meta["CPG"] for op, _, _, meta in sd15 if op == "group_norm"}
    assert cpg == {10, 20, 30, 40, 60, 80}  # 320 / 640 / 1280 channels and the up blocks' 960 / 1920 / 2560
    heads = {args[0].shape[-1] for op, _, args, _ in sd15 if op == "attention"}
    assert heads == {40, 80, 160}
    q = next(args[0] for op, _, args, _ in sd15 if op == "attention")
    assert q.shape == (2, 8, 4096, 40) and q.stride()[1:] == (40, 320, 1)  # (B, N, H, D) viewed as (B, H, N, D)
    adm = aot_models.record_model("adm-256", torch.float16, batch=1)
    assert any(meta["HAS_SCALE"] and meta["HAS_SHIFT"] for op, _, _, meta in adm if op == "group_norm")
    edm = aot_models.record_model("edm-imagenet64", torch.float16, batch=1)
    assert any(meta["HAS_SCALE"] for op, _, _, meta in edm if op == "group_norm")
    dit = aot_models.record_model("dit-xl-2-256", torch.float16, batch=2)
    assert {op for op, *_ in dit} == {"attention", "adaln_modulate", "gated_residual_modulate"}
    alt = aot_models.record_model("dit-xl-2-256", torch.float16, batch=2, ops=aot_models.PASSES["alt"])
    # TMA attention where this triton has host tensor descriptors (>= 3.4); else the pointer kernel it falls back to
    tma = importlib.import_module("fastdiff.kernels.attention_tma")._descriptor_class() is not None
    assert {op for op, *_ in alt} == {"attention_tma" if tma else "attention", "adaln_modulate", "gated_residual"}
    labels = {c.label for c in aot.configs(["models"], (torch.float16,), quick=True)}
    assert any("ddpm-cifar10" in lbl for lbl in labels) and any(" b1 " in lbl for lbl in labels)


def test_recording_matches_a_real_run_and_launches_nothing():
    """Per op, a recorded forward pass makes the launches a real one makes (the interpreter runs tiny-sd-unet on
    the CPU), and the launch helpers are restored afterwards."""
    from fastdiff.checkpoints.presets import build_arch
    from fastdiff.models.layers import set_backend

    helpers = {(m, h): getattr(importlib.import_module(f"fastdiff.kernels.{m}"), h)
               for m, h, _, _ in aot_models._HELPERS}
    recorded = collections.Counter(op for op, *_ in aot_models.record_model("tiny-sd-unet", torch.float32, batch=2))
    assert {(m, h): getattr(importlib.import_module(f"fastdiff.kernels.{m}"), h) for m, h in helpers} == helpers

    model, spec = build_arch("tiny-sd-unet")
    set_backend(model, "triton")
    real = []
    with aot_models.recording(real, passthrough=True):  # records and launches, on the CPU's interpreter
        x = torch.randn(2, spec.in_channels, 8, 8)
        model(x, torch.tensor([10.0, 20.0]), encoder_hidden_states=torch.randn(2, 77, spec.cross_attention_dim))
    assert set(recorded) == {"group_norm", "attention", "geglu", "residual_layer_norm"}
    assert collections.Counter(op for op, *_ in real) == recorded
