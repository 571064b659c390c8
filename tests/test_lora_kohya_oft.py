"""kohya's own OFT files (sd-scripts' ``networks.oft``: ``oft_unet_<module>.oft_blocks`` / ``.alpha``) merged by
``pipe.load_lora``. The reference is a module that computes what sd-scripts' ``OFTModule.forward`` computes around
the original layer (sd-scripts is no pip package): each block's rotation the Cayley transform of its skew part,
that part first scaled to a norm of at most alpha x out (clamped, kohya's way, so an alpha of 0 turns nothing),
moved toward the identity by the multiplier, applied to the weight's output rows; the bias untouched."""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdiff
from fastdiff.errors import CheckpointError, UnsupportedConfigError
from fastdiff.lora import merge, read_lora
from helpers import rel_err


class KohyaOFT(nn.Module):
    """sd-scripts' OFTModule around ``layer`` (its forward replaced), with random blocks."""

    def __init__(self, name: str, layer: nn.Module, num_blocks: int, alpha: float, multiplier: float, seed: int):
        super().__init__()
        out = layer.weight.shape[0]
        self.name, self.layer, self.orig = name, layer, layer.forward
        self.blocks = torch.randn(num_blocks, out // num_blocks, out // num_blocks,
                                  generator=torch.Generator().manual_seed(seed)) * 0.3
        self.alpha, self.constraint, self.multiplier = alpha, alpha * out, multiplier
        layer.forward = self.forward

    def rotations(self) -> torch.Tensor:
        q = self.blocks - self.blocks.transpose(1, 2)
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=self.constraint) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(q.shape[-1]).expand_as(q)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        return self.multiplier * (r - eye) + eye

    def forward(self, x):
        w = self.layer.weight.float()
        n = self.blocks.shape[0]
        rw = torch.einsum("k n m, k n ... -> k m ...", self.rotations(), w.reshape(n, -1, *w.shape[1:]))
        rw = rw.reshape(w.shape).to(x.dtype)
        if isinstance(self.layer, nn.Conv2d):
            l = self.layer
            return F.conv2d(x, rw, l.bias, l.stride, l.padding, l.dilation, l.groups)
        return F.linear(x, rw, self.layer.bias)

    def state(self) -> dict:
        return {f"{self.name}.oft_blocks": self.blocks.clone(), f"{self.name}.alpha": torch.tensor(self.alpha)}


LAYERS = {"linear": (lambda: nn.Linear(12, 24), (3, 12)),
          "conv3x3": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 5, 5)),
          "conv1x1": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 4, 4))}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("num_blocks", [2, 4])
@pytest.mark.parametrize("alpha", [1e-3, 0.05, 10.0, 0.0])  # (binding hard, binding, loose, no rotation at all)
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_each_layer_merges_to_what_kohyas_module_computes(kind, num_blocks, alpha, scale):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer, x = make(), torch.randn(shape)
    original = copy.deepcopy(layer)
    ref = KohyaOFT("oft_unet_x", copy.deepcopy(layer), num_blocks, alpha, scale, seed=num_blocks)
    want = ref(x)
    ((_, oft),) = read_lora(ref.state()).items()
    merge([(layer, oft)], scale, saved={})
    with torch.no_grad():
        got = layer(x)
    assert rel_err(got, want) <= 1e-5
    assert torch.equal(layer.bias, original.bias)  # (kohya turns the weight only)
    moved = rel_err(got, original(x).detach())
    assert moved < 1e-6 if alpha == 0.0 else moved > 1e-4  # (alpha 0: the skew part scaled to about 1e-8)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    pytest.importorskip("diffusers", reason="a diffusers pipeline runs the reference modules")
    from test_lora import tiny_pipeline_folder

    return tiny_pipeline_folder(str(tmp_path_factory.mktemp("kohya_oft")))


# what sd-scripts' OFTNetwork wraps with enable_all_linear and enable_conv: every Linear / Conv2d inside the
# Transformer2DModels, ResnetBlock2Ds, Downsample2Ds and Upsample2Ds (the attention's only, without the options)
KOHYA_PARENTS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def test_a_kohya_oft_file_equals_diffusers_running_kohyas_modules(pipeline_folder):
    from test_lora import _reference, _want
    from test_prompts import PROMPTS, _latents

    folder, unet, text_encoder = pipeline_folder
    unet = copy.deepcopy(unet)
    modules, seen = [], set()
    for parent_name, parent in list(unet.named_modules()):
        if type(parent).__name__ not in KOHYA_PARENTS:
            continue
        for child_name, child in parent.named_modules():
            full = f"{parent_name}.{child_name}"
            if isinstance(child, (nn.Linear, nn.Conv2d)) and full not in seen and child.weight.shape[0] % 4 == 0:
                seen.add(full)
                modules.append(KohyaOFT("oft_unet_" + full.replace(".", "_"), child, 4, 0.02, 0.8, seed=len(seen)))
    assert len(modules) > 30 and any(isinstance(m.layer, nn.Conv2d) and m.layer.kernel_size == (3, 3)
                                     for m in modules)
    latents = _latents()
    want = _want(_reference(os.path.dirname(folder), unet, text_encoder), latents)
    state = {k: v for m in modules for k, v in m.state().items()}
    pipe = fastdiff.load(folder)
    assert pipe.load_lora(state, scale=0.8) == {"network": len(modules)}
    got = pipe.generate(prompt=PROMPTS, latents=latents, steps=3, cfg_scale=3.0, progress=False)
    assert rel_err(got, want) <= 1e-4
    plain = fastdiff.load(folder).generate(prompt=PROMPTS, latents=latents, steps=3, cfg_scale=3.0, progress=False)
    assert rel_err(plain, want) > 1e-2
    pipe.unload_lora()
    assert torch.equal(pipe.generate(prompt=PROMPTS, latents=latents, steps=3, cfg_scale=3.0, progress=False), plain)


def test_kohya_oft_names_in_the_ldm_layout_reach_the_same_layer():
    """SDXL's files name layers in the original ldm layout (``input_blocks_1_1_...``), as kohya's SDXL LoRAs do."""
    pipe = fastdiff.load("arch:tiny-sdxl-unet")
    from fastdiff.lora import layer_names

    table = layer_names(pipe.model)
    ldm = next(n for n in table if n.startswith("~input_blocks_") and n.endswith("attn1_to_q"))
    target = table[ldm]
    diffusers_name = next(n for n, m in pipe.model.named_modules() if m is target)
    blocks = torch.randn(4, target.weight.shape[0] // 4, target.weight.shape[0] // 4) * 0.3
    merged = []
    for name in (ldm[1:], diffusers_name.replace(".", "_")):
        p = fastdiff.load("arch:tiny-sdxl-unet")
        p.load_lora({f"oft_unet_{name}.oft_blocks": blocks, f"oft_unet_{name}.alpha": torch.tensor(0.01)})
        merged.append(dict(p.model.named_modules())[diffusers_name].weight.detach().clone())
    assert torch.equal(merged[0], merged[1]) and not torch.equal(merged[0], target.weight)


def test_what_is_refused():
    blocks = torch.randn(2, 4, 4)
    cases = [({"oft_unet_x.oft_blocks": blocks}, CheckpointError, "without its alpha"),
             ({"oft_unet_x.oft_blocks": torch.randn(2, 2, 4, 4), "oft_unet_x.alpha": torch.tensor(0.1)},
              CheckpointError, "blocks \\(n, b, b\\)"),
             ({"oft_unet_x.oft_blocks": blocks, "oft_unet_x.alpha": torch.tensor(0.1),
               "oft_unet_x.rescale": torch.ones(8, 1)}, UnsupportedConfigError, "oft_unet_x.rescale"),
             ({"oft_unet_x.lora_down.weight": torch.randn(2, 4), "oft_unet_x.lora_up.weight": torch.randn(4, 2)},
              UnsupportedConfigError, "oft_unet_x.lora_down.weight")]
    for state, error, match in cases:
        with pytest.raises(error, match=match):
            read_lora(state)
    # a weight whose output rows the blocks do not cover: refused before anything merges
    pipe = fastdiff.load("arch:tiny-sd-unet")
    name = next(n for n, _ in pipe.model.named_modules() if n.endswith("to_q"))
    with pytest.raises(CheckpointError, match="output rows"):
        pipe.load_lora({f"oft_unet_{name.replace('.', '_')}.oft_blocks": torch.randn(3, 5, 5),
                        f"oft_unet_{name.replace('.', '_')}.alpha": torch.tensor(0.1)})
