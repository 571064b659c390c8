"""FreeU (``pipe.enable_freeu``) against diffusers' ``enable_freeu`` on the same tiny SD pipeline; in captured loops;
refused where it cannot run."""

import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import rel_err
from test_graph_scopes import FakeGraph
from test_prompts import sd_pipelines

diffusers = pytest.importorskip("diffusers", reason="diffusers' enable_freeu is the reference")

FREEU = dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6)  # the FreeU repository's SD 1.5 values


def _latents(b=2, seed=3):
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_freeu_equals_diffusers(tmp_path, cfg):
    ref, pipe = sd_pipelines(str(tmp_path))
    prompts = ["a photo of a red cat", "the dog and the cat"]
    kw = dict(num_inference_steps=3, guidance_scale=cfg, output_type="latent")
    plain = pipe.generate(prompt=prompts, latents=_latents(), steps=3, cfg_scale=cfg, progress=False)
    ref.enable_freeu(**FREEU)
    pipe.enable_freeu(**FREEU)
    want = ref(prompts, latents=_latents(), **kw).images
    got = pipe.generate(prompt=prompts, latents=_latents(), steps=3, cfg_scale=cfg, progress=False)
    assert rel_err(got, want) <= 1e-5 and rel_err(got, plain) > 1e-3
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=0.0)  # (any zero: off, as diffusers reads the factors)
    assert torch.equal(pipe.generate(prompt=prompts, latents=_latents(), steps=3, cfg_scale=cfg, progress=False),
                       plain)
    pipe.enable_freeu(**FREEU)
    pipe.disable_freeu()
    assert torch.equal(pipe.generate(prompt=prompts, latents=_latents(), steps=3, cfg_scale=cfg, progress=False),
                       plain)


def test_freeu_after_a_captured_loop_captures_anew_and_is_refused_where_it_cannot_run(tmp_path):
    _, eager = sd_pipelines(str(tmp_path))
    graphed = fastdiff.load(str(tmp_path / "pipe")).optimize(cuda_graphs=True, graph_scope="loop",
                                                            batch_buckets=(2,), graph_factory=FakeGraph)
    kw = dict(prompt="a red cat", seeds=[1, 2], steps=3, cfg_scale=3.0, progress=False)
    plain = graphed.generate(**kw)
    graphed.enable_freeu(**FREEU)  # (the loop captured before ran the network without it)
    eager.enable_freeu(**FREEU)
    got = graphed.generate(**kw)
    assert rel_err(got, eager.generate(**kw)) <= 1e-5 and rel_err(got, plain) > 1e-3
    with pytest.raises(BadArgumentError, match="enable_freeu\\(\\): FreeU scales a text UNet"):
        fastdiff.load("arch:tiny-dit").enable_freeu(**FREEU)
    with pytest.raises(BadArgumentError, match="s1: expected a finite number"):
        eager.enable_freeu(s1=float("nan"), s2=0.2, b1=1.5, b2=1.6)
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend")
    with pytest.raises(BadArgumentError, match="the network runs FreeU"):
        eager.optimize(backend="onnxruntime")
    eager.disable_freeu().optimize(backend="onnxruntime")
    with pytest.raises(BadArgumentError, match="enable_freeu\\(\\): this pipeline runs an exported onnxruntime"):
        eager.enable_freeu(**FREEU)


def test_cli_generate_freeu(tmp_path):
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli

    _, pipe = sd_pipelines(str(tmp_path))
    r = run_cli("generate", str(tmp_path / "pipe"), "--prompt", "a red cat", "--freeu", "0.9", "0.2", "1.5", "1.6",
                "--steps", "2", "--n", "1", "--output-latents", "out.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = pipe.enable_freeu(**FREEU).generate(prompt="a red cat", seeds=[0], steps=2, progress=False)
    assert rel_err(load_file(str(tmp_path / "out.safetensors"))["latents"], want) <= 1e-5
    r = run_cli("generate", "arch:tiny-dit", "--freeu", "0.9", "0.2", "1.5", "1.6", "--steps", "1", "--class", "1",
                "--output-latents", "x.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "FreeU scales a text UNet" in r.stderr
