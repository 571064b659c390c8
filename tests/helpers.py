"""Shared test helpers (importable as ``tests.helpers`` or ``helpers``)."""

from __future__ import annotations

import inspect
import os

import pytest
import torch


def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with random values (norm weights around 1) so no layer is trivial.

    Random-init diffusers models zero some output layers; testing on those would hide whole paths.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_weight = name.endswith("weight") and p.dim() == 1 and "norm" in name
            p.copy_(1.0 + noise if is_norm_weight else noise)
    return module


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref|."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def smooth_denoiser(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
    """A smooth stand-in network D(x; sigma) for sampler tests: neither linear nor the identity."""
    s = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return torch.tanh(x / (1 + s ** 2).sqrt()) * 0.9 + 0.05 * torch.sin(3 * x)


def denoise_at(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``smooth_denoiser`` at one host sigma, in x's dtype (what transcriptions of reference loops call)."""
    return smooth_denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))


def sampler_test_options(name: str, alphas_cumprod, sigmas) -> dict:
    """What sampler ``name`` needs beyond the common arguments in the generic sampler tests: TCD lands on
    training timesteps, so it takes the model's sigma table and the grid's timesteps."""
    if name != "tcd":
        return {}
    from fastdiff.schedules import sigma_to_timestep, sigmas_from_alphas_cumprod

    grid = [float(s) for s in sigmas]
    return dict(sigma_table=sigmas_from_alphas_cumprod(alphas_cumprod).tolist(),
                timesteps=sigma_to_timestep(grid[:-1], alphas_cumprod).tolist() + [0.0])


def diffusers_pipeline(name: str):
    """diffusers' pipeline class ``name`` (StableDiffusionXLPipeline, ...): the end-to-end reference. Those classes
    import transformers (for their text encoders, unused here); without it the test skips, saying so."""
    import diffusers

    pytest.importorskip("transformers", reason=f"diffusers' {name} imports transformers (its text encoders)")
    return getattr(diffusers, name)


def attach_controlnets(pipe, nets: list, folder, multi_class):
    """Save diffusers ControlNet models ``nets`` as folders under ``folder``, attach them to fastdiff's ``pipe``
    (one, or a list: several), and return what drives diffusers' pipeline: the one net, or ``multi_class(nets)``."""
    folders = []
    for i, net in enumerate(nets):
        net.save_pretrained(folder / f"cn{i}")
        folders.append(str(folder / f"cn{i}"))
    pipe.set_controlnet(folders[0] if len(folders) == 1 else folders)
    return nets[0] if len(nets) == 1 else multi_class(nets)


def skip_unless_diffusers_has(cls, config):
    """Skip (with the reason) on an older diffusers that lacks a setting of ``config``, or whose UniPC flow grid is
    still DPM-Solver's (diffusers 0.33 spaced it so; newer versions start it at t = 1 - 1e-6, and fastdiff follows
    them)."""
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, cls):
        pytest.skip(f"diffusers {diffusers.__version__} has no {cls}")
    scheduler = getattr(diffusers, cls)
    missing = sorted(set(config) - set(inspect.signature(scheduler.__init__).parameters))
    if missing:
        pytest.skip(f"diffusers {diffusers.__version__}'s {cls} has no {missing}")
    if cls == "UniPCMultistepScheduler" and config.get("use_flow_sigmas"):
        probe = scheduler(use_flow_sigmas=True, prediction_type="flow_prediction", num_train_timesteps=10)
        probe.set_timesteps(4)
        if float(probe.sigmas[0]) < 0.99:              # (the older grid starts at 1 - 1 / T = 0.9)
            pytest.skip(f"diffusers {diffusers.__version__} spaces UniPC's flow grid as DPM-Solver's (fastdiff "
                        f"follows the newer grid from t = 1)")


class Evil:
    """A pickle payload: unpickling it would run a shell command. Loaders must refuse it unread."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def lora_state(model, suffixes=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "time_emb_proj"), seed=0) -> dict:
    """A diffusers-format LoRA state (rank 2, small random weights) for ``model``'s layers ending in ``suffixes``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in model.named_modules():
        if any(name.endswith(s) for s in suffixes) and hasattr(layer, "weight"):
            w = layer.weight
            state[f"unet.{name}.lora_A.weight"] = torch.randn(2, *w.shape[1:], generator=g) * 0.1
            state[f"unet.{name}.lora_B.weight"] = torch.randn(w.shape[0], 2, *([1] * (w.dim() - 2)), generator=g) * 0.1
    return state


# diffusers' resnet sub-layers -> their ldm names (the tests' own table: it checks fastdiff's renaming)
LDM_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_single_file(state: dict, config: dict) -> dict:
    """A diffusers UNet state dict in the sgm / ldm single-file layout (model.diffusion_model.*)."""
    per, levels = config["layers_per_block"], len(config["block_out_channels"])
    out = {}

    def move(src, dst, resnet=False):
        for k in [k for k in state if k.startswith(src + ".")]:
            rest = k[len(src) + 1:]
            if resnet:
                head, _, tail = rest.partition(".")
                rest = LDM_RESNET_PARTS.get(head, head) + "." + tail
            out[f"model.diffusion_model.{dst}.{rest}"] = state[k]

    move("conv_in", "input_blocks.0.0")
    move("time_embedding.linear_1", "time_embed.0")
    move("time_embedding.linear_2", "time_embed.2")
    move("add_embedding.linear_1", "label_emb.0.0")
    move("add_embedding.linear_2", "label_emb.0.2")
    for lvl in range(levels):
        for j in range(per):
            k = 1 + lvl * (per + 1) + j
            move(f"down_blocks.{lvl}.resnets.{j}", f"input_blocks.{k}.0", resnet=True)
            move(f"down_blocks.{lvl}.attentions.{j}", f"input_blocks.{k}.1")
        move(f"down_blocks.{lvl}.downsamplers.0.conv", f"input_blocks.{1 + lvl * (per + 1) + per}.0.op")
    move("mid_block.resnets.0", "middle_block.0", resnet=True)
    move("mid_block.attentions.0", "middle_block.1")
    move("mid_block.resnets.1", "middle_block.2", resnet=True)
    for lvl in range(levels):
        attn = any(k.startswith(f"up_blocks.{lvl}.attentions.") for k in state)
        for j in range(per + 1):
            move(f"up_blocks.{lvl}.resnets.{j}", f"output_blocks.{lvl * (per + 1) + j}.0", resnet=True)
            move(f"up_blocks.{lvl}.attentions.{j}", f"output_blocks.{lvl * (per + 1) + j}.1")
        move(f"up_blocks.{lvl}.upsamplers.0.conv", f"output_blocks.{lvl * (per + 1) + per}.{2 if attn else 1}.conv")
    move("conv_norm_out", "out.0")
    move("conv_out", "out.2")
    assert len(out) == len(state), sorted(set(state) - {k for k in state if any(v is state[k] for v in out.values())})
    return out
