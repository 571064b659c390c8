"""fastdiff.load: format detection, diffusers folders, the fastdiff format, and bad input."""

import json
import math
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from fastdiff.errors import (CorruptCheckpointError, StateDictMismatchError, UnknownFormatError,
                             UnsafeCheckpointError, UnsupportedConfigError)
from helpers import Evil, perturb_, rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers writes the reference folders")

TINY_COND = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
                 norm_num_groups=8)


@pytest.fixture(scope="module")
def ref_unet():
    torch.manual_seed(0)
    return perturb_(diffusers.UNet2DConditionModel(**TINY_COND).eval(), seed=0)


def _check_same(pipe, ref):
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert rel_err(pipe.model(x, torch.tensor([10, 900]), encoder_hidden_states=ctx),
                       ref(x, torch.tensor([10, 900]), encoder_hidden_states=ctx).sample) <= 1e-5


@pytest.mark.parametrize("safe,shard", [(True, None), (False, None), (True, "300KB"), (False, "300KB")])
def test_diffusers_model_folder(tmp_path, ref_unet, safe, shard):
    kw = {"max_shard_size": shard} if shard else {}
    ref_unet.save_pretrained(tmp_path, safe_serialization=safe, **kw)
    if shard:
        assert any(n.endswith(".index.json") for n in os.listdir(tmp_path))
    pipe = fastdiff.load(str(tmp_path))
    assert pipe.spec.kind == "unet" and pipe.spec.cross_attention_dim == 16
    _check_same(pipe, ref_unet)


def test_diffusers_pipeline_folder_reads_scheduler(tmp_path, ref_unet):
    ref_unet.save_pretrained(tmp_path / "unet")
    sched = diffusers.DPMSolverMultistepScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    sched.save_pretrained(tmp_path / "scheduler")
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    pipe = fastdiff.load(str(tmp_path))
    assert pipe.spec.prediction_type == "v_prediction"
    assert pipe.spec.scheduler["_class_name"] == "DPMSolverMultistepScheduler"
    assert any("vae" in n for n in pipe.spec.notes)
    _check_same(pipe, ref_unet)
    # prediction_type= overrides the scheduler config too: scheduler-config plans read its field
    forced = fastdiff.load(str(tmp_path), prediction_type="epsilon")
    assert forced.spec.prediction_type == "epsilon" and forced.spec.scheduler["prediction_type"] == "epsilon"
    assert forced.plan(4).make_denoiser(forced.runner).prediction_type == "epsilon"
    with pytest.raises(fastdiff.BadArgumentError, match="prediction_type"):
        fastdiff.load(str(tmp_path), prediction_type="v")


def test_fastdiff_round_trip_and_dtype(tmp_path, ref_unet):
    ref_unet.save_pretrained(tmp_path / "src")
    pipe = fastdiff.load(str(tmp_path / "src"))
    pipe.save(str(tmp_path / "fd"))
    assert sorted(os.listdir(tmp_path / "fd")) == ["fastdiff.json", "model.safetensors"]
    again = fastdiff.load(str(tmp_path / "fd"))
    assert again.spec == pipe.spec
    _check_same(again, ref_unet)
    half = fastdiff.load(str(tmp_path / "fd"), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, ref_unet):
    ref_unet.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    from fastdiff.checkpoints.io import read_safetensors

    state = read_safetensors(str(path))
    del state["conv_in.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["conv_out.bias"] = torch.zeros(5)
    save_file(state, str(path))
    with pytest.raises(StateDictMismatchError) as e:
        fastdiff.load(str(tmp_path))
    msg = str(e.value)
    assert "1 missing" in msg and "conv_in.weight" in msg
    assert "1 unexpected" in msg and "extra.weight" in msg
    assert "conv_out.bias: expected (4,), found (5,)" in msg


def test_unknown_format_lists_supported(tmp_path):
    p = tmp_path / "weights.xyz"
    p.write_bytes(b"hello")
    with pytest.raises(UnknownFormatError) as e:
        fastdiff.load(str(p))
    assert "diffusers model folder" in str(e.value) and ".xyz" in str(e.value)
    with pytest.raises(UnknownFormatError):
        fastdiff.load(str(tmp_path))  # a folder with nothing recognisable


def test_pickle_of_objects_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, str(p))
    with pytest.raises(UnsafeCheckpointError) as e:
        fastdiff.load(str(p))
    assert "weights_only" in str(e.value)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)):
        fastdiff.load(str(raw))


def test_an_edm_pkl_is_refused_with_how_to_convert_it(tmp_path):
    """NVlabs/edm's released networks are pickles of their own code: refused unread, and the error says how to
    turn one into the EDMPrecond state dict fastdiff reads."""
    p = tmp_path / "edm-cifar10-32x32-cond-vp.pkl"
    p.write_bytes(pickle.dumps({"ema": Evil()}))
    with pytest.raises(UnsafeCheckpointError, match=r"never executes a pickle.*state_dict\(\)"):
        fastdiff.load(str(p))


def test_truncated_safetensors_is_reported(tmp_path, ref_unet):
    ref_unet.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError) as e:
        fastdiff.load(str(tmp_path))
    assert "truncated" in str(e.value)


@pytest.mark.parametrize("field,value", [("act_fn", "gelu"),
                                         ("addition_embed_type", "text_image"), ("attention_type", "gated"),
                                         ("resnet_time_scale_shift", "spatial")])
def test_unsupported_config_field_names_field_and_value(tmp_path, ref_unet, field, value):
    ref_unet.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError) as e:
        fastdiff.load(str(tmp_path))
    assert field in str(e.value) and repr(value) in str(e.value)


def test_a_per_block_list_of_a_supported_value_is_that_value(tmp_path, ref_unet):
    """diffusers takes only_cross_attention per down block too: [False, False] is the network False gives."""
    ref_unet.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["only_cross_attention"] = [False] * len(cfg["down_block_types"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _check_same(fastdiff.load(str(tmp_path)), ref_unet)


def test_saved_files_get_ordinary_permissions(tmp_path):
    pipe = fastdiff.load("arch:tiny-unet")
    pipe.save(str(tmp_path / "m"))
    mask = os.umask(0)
    os.umask(mask)
    assert (os.stat(tmp_path / "m").st_mode & 0o777) == 0o777 & ~mask
    assert (os.stat(tmp_path / "m" / "model.safetensors").st_mode & 0o777) == 0o666 & ~mask


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_heads=0), "BadArgumentError", "num_heads: expected a positive int"),
    (dict(head_channels=True), "BadArgumentError", "head_channels: expected a positive int"),
    (dict(scheduler="linear"), "BadArgumentError", "scheduler: expected a dict"),
    (dict(dtype="fp8"), "BadArgumentError", "dtype: expected torch.float32 / float16 / bfloat16 or one of"),
    (dict(dtype=torch.int8), "BadArgumentError", "found torch.int8"),  # was a TypeError from nn.Module.to
    (dict(device="gpu0"), "BadArgumentError", "device: expected a torch device"),
    (dict(variant="fp16"), "BadArgumentError", "variant= does not apply"),
    (dict(num_heads=2), "BadArgumentError", "num_heads= does not apply"),
])
def test_load_arguments_are_checked_not_ignored(tmp_path, kwargs, error, match):
    """Every loading argument is checked; one the source would ignore is refused (here a fastdiff folder, whose
    spec already fixes the heads, and which has no diffusers weight variants)."""
    import fastdiff.errors as errors

    fastdiff.load("arch:tiny-unet").save(str(tmp_path / "m"))
    with pytest.raises(getattr(errors, error), match=match):
        fastdiff.load(str(tmp_path / "m"), **kwargs)


def test_load_takes_dtype_names_and_applies_overrides_to_arch():
    pipe = fastdiff.load("arch:tiny-unet", dtype="fp16", prediction_type="v_prediction")
    assert pipe.dtype == torch.float16 and pipe.spec.prediction_type == "v_prediction"


@pytest.mark.parametrize("header", ['[1, 2]', '{"format": "fastdiff", "format_version": "1", "spec": {}}',
                                    '{"format": "fastdiff", "format_version": 1}',
                                    '{"format": "fastdiff", "format_version": 1, "spec": {"kind": 3}}'])
def test_a_damaged_fastdiff_json_is_a_corrupt_checkpoint(tmp_path, header):
    """A hand-edited fastdiff.json gives a FastdiffError naming the problem, never a raw KeyError / TypeError."""
    from fastdiff.errors import FastdiffError

    fastdiff.load("arch:tiny-unet").save(str(tmp_path / "m"))
    (tmp_path / "m" / "fastdiff.json").write_text(header)
    with pytest.raises(FastdiffError, match="fastdiff.json|kind"):
        fastdiff.load(str(tmp_path / "m"))


def test_a_lightning_ckpt_loads_without_lightning_and_runs_none_of_its_code(tmp_path, monkeypatch):
    """A Stable Diffusion ``.ckpt`` saved by a Lightning training run holds its ``ModelCheckpoint`` callback beside
    the weights. It loads (the callback read as a data-only stand-in, Lightning not installed, its code never run)
    and equals the same weights saved without it; any other class is still refused."""
    import sys
    import types

    from safetensors.torch import load_file

    from conftest import fixture_path

    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 6):
        pytest.skip("torch < 2.6 cannot map a checkpoint's class name to a stand-in: such files are refused")
    ran = []

    class ModelCheckpoint:  # what the pickle names; defined here only to write the file
        def __init__(self):
            self.best_model_score, self.monitor = torch.tensor(0.25), "val/loss"

        def __setstate__(self, state):
            ran.append("setstate")
            self.__dict__.update(state)

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    module.ModelCheckpoint = ModelCheckpoint
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):  # pickle imports the parent packages too
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    state = load_file(fixture_path("ldm", "ldm_sd1_style.safetensors"))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1,
                "callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": ModelCheckpoint()}}, str(ckpt))
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # as on a machine without Lightning
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, str(plain))
    got, want = fastdiff.load(str(ckpt), num_heads=4), fastdiff.load(str(plain), num_heads=4)
    assert not ran
    for k, v in want.model.state_dict().items():
        torch.testing.assert_close(got.model.state_dict()[k], v, rtol=0, atol=0)

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "callbacks": {"x": Evil()}}, str(evil))
    with pytest.raises(UnsafeCheckpointError):
        fastdiff.load(str(evil))


def _adm_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """guided-diffusion's ``timestep_embedding`` (nn.py): cos then sin, max period 10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_guided_diffusion_size_from_its_levels_and_a_half_width_first_level(tmp_path):
    """ADM's create_model picks channel_mult by image size: the level count gives the default size (it was always 64),
    with a note. A first level narrower than model_channels (OpenAI's 512x512 model: channel_mult 0.5, 1, 1, 2, 2,
    4, 4) loads: its timestep sinusoid is model_channels wide. The reference: the fixture's network (equal to the
    official one) with its time embedding replaced by the official embedding of the widened weights."""
    from conftest import fixture_path

    path = fixture_path("guided_diffusion", "model.pt")
    pipe = fastdiff.load(path, head_channels=16)
    levels = len(pipe.model.config.block_out_channels)
    assert any(f"from its {levels} levels" in n for n in pipe.spec.notes)
    sd = torch.load(path, weights_only=True)
    width = sd["input_blocks.0.0.weight"].shape[0]
    w1 = torch.randn(sd["time_embed.0.weight"].shape[0], 2 * width, generator=torch.Generator().manual_seed(0)) * 0.1
    sd["time_embed.0.weight"] = w1  # model_channels = 2 x the first level's width
    torch.save(sd, str(tmp_path / "half.pt"))
    half = fastdiff.load(str(tmp_path / "half.pt"), head_channels=16)
    assert half.model.config.time_proj_dim == 2 * width

    t, y = torch.tensor([3, 640]), torch.tensor([1, 0])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def official_time_embed(module, inputs, output):  # time_embed = Linear, SiLU, Linear on the wide sinusoid
        h = torch.nn.functional.silu(_adm_timestep_embedding(t, 2 * width) @ w1.T + sd["time_embed.0.bias"])
        return h @ sd["time_embed.2.weight"].T + sd["time_embed.2.bias"]

    with torch.no_grad():
        got = half.model(x, t, class_labels=y)
        hook = pipe.model.time_embedding.register_forward_hook(official_time_embed)
        try:
            want = pipe.model(x, t, class_labels=y)
        finally:
            hook.remove()
        plain = pipe.model(x, t, class_labels=y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert float((got - plain).abs().max()) > 1e-3  # the embedding matters
