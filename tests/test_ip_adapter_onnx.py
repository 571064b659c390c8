"""IP-Adapters under the onnxruntime backend: the exported graph takes each adapter's image features
(``image_embeds_<k>``) and every layer's adapter scales (``ip_scales``) as inputs, so the exported run equals the
eager one (base, Plus, several adapters, Face ID Plus, per-block scales, a scale set after the export), and loading
or unloading an adapter exports again. Masks are refused by name."""

import os

import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import rel_err
from test_ip_adapter import _adapter, _image, _plus_adapter, diffusers  # noqa: F401 (diffusers: its skip)
from test_prompts import sd_pipelines

pytest.importorskip("onnxruntime", reason="the onnxruntime backend runs the exported graph")


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """(an eager pipeline, an onnxruntime one of the same folder, the base adapter's folder, the Plus one's)."""
    folder = str(tmp_path_factory.mktemp("ip_onnx"))
    ref, eager = sd_pipelines(folder)
    base = _adapter(os.path.join(folder, "base"), ref.unet)
    plus = _plus_adapter(os.path.join(folder, "plus"), ref.unet)
    return eager, fastdiff.load(os.path.join(folder, "pipe")), base, plus


def _both(pipes, **load):
    for p in pipes:
        p.load_ip_adapter(**load)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_an_exported_graph_takes_the_image_prompt(three, cfg):
    eager, ort, base, _ = three
    plain = eager.generate(prompt="a red cat", seeds=[1, 2], steps=3, cfg_scale=cfg, progress=False)
    _both((eager, ort), path=base, weight_name="ip.safetensors")
    try:
        ort.optimize(backend="onnxruntime")
        runner = ort.runner
        kw = dict(prompt="a red cat", seeds=[1, 2], steps=3, cfg_scale=cfg, ip_adapter_image=_image(), progress=False)
        first = ort.generate(**kw)
        assert rel_err(first, eager.generate(**kw)) <= 1e-5
        assert rel_err(first, plain) > 1e-3  # (the image prompt counts)
        for scale in (0.3, {"up": {"block_0": [0.0, 1.0]}}):  # a scale after the export: an input, no new graph
            for p in (eager, ort):
                p.set_ip_adapter_scale(scale)
            got = ort.generate(**kw)
            assert ort.runner is runner and rel_err(got, eager.generate(**kw)) <= 1e-5 and rel_err(got, first) > 1e-4
        other = dict(kw, ip_adapter_image=_image(seed=9))
        assert rel_err(ort.generate(**other), eager.generate(**other)) <= 1e-5
        with pytest.raises(BadArgumentError, match="IP-Adapter masks under an exported"):
            ort.generate(**kw, ip_adapter_masks=torch.ones(1, 1, 16, 16))
    finally:
        for p in (eager, ort):
            p.unload_ip_adapter()
    # unloaded: exported again without the adapter, the plain run
    assert rel_err(ort.generate(prompt="a red cat", seeds=[1, 2], steps=3, cfg_scale=cfg, progress=False),
                   plain) <= 1e-5


def test_several_adapters_and_one_loaded_after_the_export(three):
    """Plus (hidden states: (B, N, S, E)) beside the base adapter on two images, loaded onto a pipeline already
    running ONNX Runtime: exported again with both."""
    eager, ort, base, plus = three
    ort.optimize(backend="onnxruntime")
    before = ort.runner
    _both((eager, ort), path=[plus, base], subfolder="", weight_name=["plus.safetensors", "ip.safetensors"])
    try:
        assert ort.runner is not before
        for p in (eager, ort):
            p.set_ip_adapter_scale([0.8, 0.5])
        images = [_image(seed=2), [_image(seed=3), _image(seed=4)]]
        kw = dict(prompt="a red cat", seeds=[5, 6], steps=3, cfg_scale=3.0, ip_adapter_image=images, progress=False)
        got = ort.generate(**kw)
        assert rel_err(got, eager.generate(**kw)) <= 1e-5
        one = dict(kw, ip_adapter_image=[_image(seed=2), [_image(seed=3)]])  # (another count of images: dynamic)
        assert rel_err(ort.generate(**one), eager.generate(**one)) <= 1e-5
    finally:
        for p in (eager, ort):
            p.unload_ip_adapter()


@pytest.mark.parametrize("cfg_folded", [False, True])
def test_export_onnx_checks_the_image_inputs(three, tmp_path, cfg_folded):
    """export_onnx's own parity check (ONNX Runtime against PyTorch on seeded inputs: two images per adapter, three
    hidden states, every layer's own scale, the CFG-folded graph's uncond features) passes, and the stored interface
    names the adapters."""
    from fastdiff.export.onnx import export_onnx, read_onnx_io

    _, ort, base, plus = three
    ort.load_ip_adapter([plus, base], subfolder="", weight_name=["plus.safetensors", "ip.safetensors"])
    try:
        res = export_onnx(ort, None, str(tmp_path / "m.onnx"), cfg_folded=cfg_folded, progress=False)
    finally:
        ort.unload_ip_adapter()
    assert res.max_rel_err is not None and res.max_rel_err < 1e-4, res.check_note
    io = read_onnx_io(str(tmp_path / "m.onnx"))
    names = [n for n, _ in io["inputs"]]
    assert {"image_embeds_0", "image_embeds_1", "ip_scales"} <= set(names)
    assert ("uncond_image_embeds_1" in names) == cfg_folded and "uncond_ip_scales" not in names
    assert io["ip_adapters"]["count"] == 2 and io["ip_adapters"]["ranks"] == [2, 1]


def test_face_id_plus_under_onnxruntime(tmp_path):
    """Face ID Plus's packed input (the face embedding, then the crop's hidden states): its last axis is dynamic."""
    from test_ip_adapter_faceid_plus import NAME, _embeds
    from test_ip_adapter_faceid_plus import _plus_adapter as _face_plus_adapter

    ref, eager = sd_pipelines(str(tmp_path))
    folder = _face_plus_adapter(str(tmp_path / "adapter"), ref.unet)
    ort = fastdiff.load(str(tmp_path / "pipe")).optimize(backend="onnxruntime")
    _both((eager, ort), path=folder, weight_name=NAME, scale=0.7)
    kw = dict(prompt="a red cat", seeds=[1, 2], steps=3, cfg_scale=3.0, ip_adapter_image_embeds=_embeds(),
              ip_adapter_image=_image(seed=6), progress=False)
    assert rel_err(ort.generate(**kw), eager.generate(**kw)) <= 1e-5


def test_tensorrt_still_refuses_an_image_prompt(three, monkeypatch):
    """(TensorRT's engines have no profile for the image inputs yet: refused by name, wherever TensorRT exists.)"""
    from fastdiff.runtime import runners

    eager, ort, base, _ = three
    monkeypatch.setattr(runners, "check_backend", lambda backend, device: None)  # (as if TensorRT were here)
    ort.load_ip_adapter(base, weight_name="ip.safetensors")
    try:
        with pytest.raises(BadArgumentError, match="no image prompt profile yet"):
            runners.build_runner(ort, fastdiff.OptimizeConfig(backend="tensorrt"))
    finally:
        ort.unload_ip_adapter()
