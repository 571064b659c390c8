"""fastdiff.load on damaged and unusual real-world files: each is refused with the right error class, naming what was
expected and what was found, or read as what it is. Nothing half-loads silently."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastdiff
from fastdiff.checkpoints.common import Renamer, RequiredKeys
from fastdiff.errors import (CheckpointError, CorruptCheckpointError, StateDictMismatchError, UnsafeCheckpointError,
                             UnsupportedConfigError)
from helpers import Evil, perturb_, rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers writes the reference folders")

TINY = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def ref():
    return perturb_(diffusers.UNet2DModel(**TINY).eval(), seed=0)


def same_as(pipe, ref):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return rel_err(pipe.model(x.to(pipe.dtype), torch.tensor([10, 900])).float(),
                       ref(x, torch.tensor([10, 900])).sample)


def folder(tmp_path, ref, **save):
    ref.save_pretrained(tmp_path, **save)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# sharded folders
# ---------------------------------------------------------------------------------------------------------------

def sharded(tmp_path, ref):
    folder(tmp_path, ref, max_shard_size="20KB")
    index = tmp_path / (WEIGHTS + ".index.json")
    return index, json.loads(index.read_text())


def test_a_key_in_a_shard_the_index_does_not_name_is_refused(tmp_path, ref):
    """The index says which shard holds a key; a second copy elsewhere (here with other values) is not taken."""
    index, data = sharded(tmp_path, ref)
    key, shard = next(iter(data["weight_map"].items()))
    other = next(s for s in sorted(set(data["weight_map"].values())) if s != shard)
    tensors = load_file(str(tmp_path / other))
    tensors[key] = load_file(str(tmp_path / shard))[key] + 100
    save_file(tensors, str(tmp_path / other))
    with pytest.raises(CorruptCheckpointError, match=f"{other} holds 1 key.* places in another shard.*{key}"):
        fastdiff.load(str(tmp_path))


def test_a_missing_shard_is_named(tmp_path, ref):
    index, data = sharded(tmp_path, ref)
    gone = sorted(set(data["weight_map"].values()))[-1]
    os.remove(tmp_path / gone)
    with pytest.raises(CorruptCheckpointError, match=f"lists shard {gone} .* not found in"):
        fastdiff.load(str(tmp_path))


@pytest.mark.parametrize("weight_map,match", [
    ("list", "expected a JSON object, found a JSON list"),
    ({"conv_in.weight": 3}, "expected a 'weight_map' object of key -> shard file name"),
    ({"conv_in.weight": "../outside.safetensors"}, "expected shard file names inside"),
])
def test_a_broken_index_is_a_corrupt_checkpoint(tmp_path, ref, weight_map, match):
    index, data = sharded(tmp_path, ref)
    index.write_text(json.dumps([1, 2]) if weight_map == "list" else json.dumps(dict(data, weight_map=weight_map)))
    with pytest.raises(CorruptCheckpointError, match=match):
        fastdiff.load(str(tmp_path))


def test_a_sharded_variant_in_diffusers_naming_loads(tmp_path, ref):
    """diffusers writes a sharded fp16 variant as <name>.safetensors.index.fp16.json + <name>.fp16-0000N-of-... files."""
    folder(tmp_path, ref, variant="fp16", max_shard_size="20KB")
    assert (tmp_path / (WEIGHTS + ".index.fp16.json")).is_file()
    assert same_as(fastdiff.load(str(tmp_path), variant="fp16"), ref) <= 1e-5


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_a_folder_of_variant_files_names_the_variant(tmp_path, ref, shard):
    folder(tmp_path, ref, variant="fp16", **({"max_shard_size": shard} if shard else {}))
    with pytest.raises(CheckpointError, match=r"variant\(s\) \['fp16'\]: pass variant="):
        fastdiff.load(str(tmp_path))


def test_an_unsupported_model_class_is_named(tmp_path, ref):
    folder(tmp_path, ref)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, _class_name="UNet3DConditionModel")))
    with pytest.raises(UnsupportedConfigError, match="_class_name.*UNet3DConditionModel"):
        fastdiff.load(str(tmp_path))


def test_a_config_that_is_no_json_object_is_a_corrupt_checkpoint(tmp_path, ref):
    folder(tmp_path, ref)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CorruptCheckpointError, match="config.json: expected a JSON object, found a JSON list"):
        fastdiff.load(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------------------------

def test_a_damaged_weight_is_refused_by_name(tmp_path, ref):
    """NaN / inf in a weight (a damaged download) is refused, instead of a model whose outputs are all NaN."""
    folder(tmp_path, ref)
    tensors = load_file(str(tmp_path / WEIGHTS))
    tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(tmp_path / WEIGHTS))
    with pytest.raises(CorruptCheckpointError, match=r"expected finite weights.*\['conv_in.weight'\]"):
        fastdiff.load(str(tmp_path))


def test_an_integer_tensor_for_a_float_parameter_is_named(tmp_path, ref):
    folder(tmp_path, ref)
    tensors = load_file(str(tmp_path / WEIGHTS))
    tensors["conv_in.bias"] = tensors["conv_in.bias"].to(torch.int8)
    save_file(tensors, str(tmp_path / WEIGHTS))
    with pytest.raises(StateDictMismatchError, match="conv_in.bias: expected a floating-point dtype, found torch.int8"):
        fastdiff.load(str(tmp_path), dtype=torch.float32)


@pytest.mark.parametrize("dtypes,loads_as", [((torch.float16, torch.float32), torch.float16),
                                             ((torch.float32, torch.float16), torch.float32),
                                             ((torch.float8_e4m3fn, torch.bfloat16), torch.bfloat16)])
def test_a_file_of_mixed_float_dtypes_loads_in_one(tmp_path, ref, dtypes, loads_as):
    """fp16 weights with float32 biases, float8 matrices with bf16 norms: with no dtype asked for, the network gets
    the dtype that holds most of the values (float8 widened to bf16), runs, and the notes say so."""
    folder(tmp_path, ref)
    tensors = load_file(str(tmp_path / WEIGHTS))
    tensors = {k: v.to(dtypes[0] if v.dim() > 1 else dtypes[1]) for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / WEIGHTS))
    pipe = fastdiff.load(str(tmp_path))
    assert {p.dtype for p in pipe.model.parameters()} == {loads_as}
    assert any(f"loaded as {str(loads_as)[6:]}" in n for n in pipe.notes), pipe.notes
    assert torch.isfinite(pipe.generate(seeds=[0], steps=2, sampler="ddim", progress=False)).all()


def test_a_fused_projection_of_the_wrong_size_is_a_mismatch():
    state = RequiredKeys({"qkv.weight": torch.zeros(10, 4), "qkv.bias": torch.zeros(10)}, model="test")
    with pytest.raises(StateDictMismatchError, match=r"qkv.weight: expected \(12, 4\), found \(10, 4\)"):
        Renamer(state, "test").split(["q", "k", "v"], "qkv", (4, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# torch files
# ---------------------------------------------------------------------------------------------------------------

def official_dit_state():
    from fastdiff.models.dit import DiT, DiTConfig

    model = perturb_(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                                   num_classes=10)), seed=1)
    return model.state_dict()


def test_a_training_checkpoint_with_an_unreadable_ema_is_refused(tmp_path):
    """train.py's 'ema' is what samples; one that holds something else must not fall back to the training weights."""
    state = official_dit_state()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "ema": dict(state, step=7)}, str(path))
    with pytest.raises(CorruptCheckpointError, match="expected 'ema' to hold a state dict of tensors, found 'step': a"):
        fastdiff.load(str(path))


def test_refusals_name_the_global_and_never_advise_running_the_pickle(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, str(evil))
    with pytest.raises(UnsafeCheckpointError, match=r"it names (posix|os)\.system") as e:
        fastdiff.load(str(evil))
    assert "weights_only=False" not in str(e.value) and "Re-running" not in str(e.value)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps({"w": Evil()}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="is a plain Python pickle, not a torch checkpoint"):
        fastdiff.load(str(raw))


def test_a_safetensors_file_named_pt_is_read_as_safetensors(tmp_path):
    state = official_dit_state()
    path = tmp_path / "dit.pt"
    save_file(state, str(path))
    pipe = fastdiff.load(str(path), num_heads=2)
    assert pipe.spec.kind == "dit"
    assert torch.equal(pipe.model.state_dict()["x_embedder.proj.weight"], state["x_embedder.proj.weight"])


def test_a_guessed_dit_head_count_is_noted(tmp_path):
    path = tmp_path / "dit.pt"
    torch.save(official_dit_state(), str(path))
    assert any("num_heads guessed as 1" in n for n in fastdiff.load(str(path)).notes)
    assert not any("guessed" in n for n in fastdiff.load(str(path), num_heads=2).notes)


def test_a_git_lfs_pointer_named_safetensors_says_so(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CorruptCheckpointError, match="git-lfs pointer, not the weights"):
        fastdiff.load(str(path))


def test_a_path_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(official_dit_state(), str(tmp_path / "dit.pt"))
    assert fastdiff.load("~/dit.pt", num_heads=2).spec.kind == "dit"


def test_a_scheduler_fastdiff_does_not_have_is_noted(tmp_path, ref):
    ref.save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "SASolverScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}))
    pipe = fastdiff.load(str(tmp_path))
    assert any("'SASolverScheduler' has no fastdiff counterpart" in n for n in pipe.notes)
    assert same_as(pipe, ref) <= 1e-5
    # given at load (the CLI's --scheduler FILE) it is noted too; it fell back to DDIM silently
    given = fastdiff.load(str(tmp_path / "unet"), scheduler={"_class_name": "SASolverScheduler"})
    assert any("'SASolverScheduler' has no fastdiff counterpart" in n for n in given.notes)



@pytest.mark.parametrize("kind", ["random bytes after PROTO", "a legacy torch file cut short"])
def test_damaged_bytes_are_corrupt_not_unsafe(tmp_path, kind):
    """Only a whole, well-formed pickle is called one (and refused as unsafe); damaged bytes are a corrupt file."""
    path = tmp_path / "w.pt"
    if kind.startswith("random"):
        path.write_bytes(b"\x80" + bytes(range(256)) * 4)
    else:
        torch.save(official_dit_state(), str(path), _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:170])
    with pytest.raises(CorruptCheckpointError, match="cannot read torch checkpoint"):
        fastdiff.load(str(path))


def test_json_is_read_as_utf8_whatever_the_locale(tmp_path, ref):
    import subprocess
    import sys

    folder(tmp_path, ref)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, _name_or_path="/home/José/modèles"),
                                                     ensure_ascii=False), encoding="utf-8")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    r = subprocess.run([sys.executable, "-X", "utf8=0", "-c", f"import fastdiff; fastdiff.load({str(tmp_path)!r})"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_mixed_file_never_narrows_into_overflow():
    """fp16 weights with a float32 tensor holding 1e5 (past fp16's 65504): loaded in float32, not as inf."""
    from fastdiff.checkpoints.common import load_dtype

    state = {"w": torch.zeros(1000, dtype=torch.float16), "b": torch.tensor([1e5, 1.0])}
    assert load_dtype(state, None) == torch.float32
    assert load_dtype(dict(state, b=torch.tensor([1.0, 2.0])), None) == torch.float16
    assert load_dtype({"w": torch.zeros(10).to(torch.float8_e4m3fn), "n": torch.ones(2, dtype=torch.bfloat16)},
                      None) == torch.bfloat16


def test_variant_names_with_dashes_and_dots_are_hinted(tmp_path, ref):
    folder(tmp_path, ref)
    os.rename(tmp_path / WEIGHTS, tmp_path / "diffusion_pytorch_model.non-ema.safetensors")
    with pytest.raises(CheckpointError, match=r"variant\(s\) \['non-ema'\]"):
        fastdiff.load(str(tmp_path))
    assert same_as(fastdiff.load(str(tmp_path), variant="non-ema"), ref) <= 1e-5


@pytest.mark.parametrize("kind, change, field", [
    ("dit", dict(patch_size=0), "patch_size"), ("dit", dict(patch_size="2"), "patch_size"),
    ("dit", dict(sample_size="32"), "sample_size"), ("dit", dict(sample_size=[32, 32]), "sample_size"),
    ("dit", dict(num_layers="2"), "num_layers"), ("dit", dict(norm_eps="1e-6x"), "norm_eps"),
    ("unet", dict(num_class_embeds=-1), "num_class_embeds"),
    ("unet", dict(transformer_layers_per_block=[1, "2"]), "transformer_layers_per_block"),
    ("unet", dict(transformer_layers_per_block=[[1], [-1]]), "transformer_layers_per_block"),
    ("vae", dict(latent_channels=-4), "latent_channels"), ("vae", dict(norm_num_groups=0), "norm_num_groups"),
    ("vae", dict(block_out_channels=[]), "block_out_channels")])
def test_odd_config_values_are_refused_by_field(kind, change, field):
    """From a review: each was a ZeroDivisionError, TypeError, ValueError or torch RuntimeError (a negative
    dimension) before; a pipeline's VAE that failed so failed the whole load instead of becoming a note."""
    from fastdiff.checkpoints.dit import dit_config_from_diffusers
    from fastdiff.errors import UnsupportedConfigError
    from fastdiff.models.unet import UNet, UNetConfig
    from fastdiff.models.vae import VAEConfig

    base = {"dit": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                        sample_size=8, patch_size=2, num_embeds_ada_norm=10),
            "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=8),
            "vae": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)}[kind]
    build = {"dit": dit_config_from_diffusers, "vae": VAEConfig.from_diffusers,
             "unet": lambda c: UNet(UNetConfig.from_diffusers({**c, "_class_name": "UNet2DConditionModel"}))}[kind]
    build(base)  # the unchanged config builds
    if kind == "unet":  # (0 layers: SDXL's first level, diffusers' small / mid SDXL ControlNets; a review)
        build({**base, "transformer_layers_per_block": [0, 1]})
    with pytest.raises(UnsupportedConfigError, match=f"'{field}'"):
        build({**base, **change})


def test_a_damaged_fastdiff_json_is_refused_by_name(tmp_path):
    """From a review: binary bytes were a UnicodeDecodeError, a list for the model config an AttributeError, and a
    list for the scheduler loaded, then failed in generate() with a TypeError."""
    from fastdiff.errors import CorruptCheckpointError, FastdiffError

    path = fastdiff.load("arch:tiny-unet").save(str(tmp_path / "saved"))
    spec_file = tmp_path / "saved" / "fastdiff.json"
    header = json.loads(spec_file.read_text())
    spec_file.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CorruptCheckpointError, match="expected a JSON text file"):
        fastdiff.load(path)
    for field, value in (("model_config", [1]), ("scheduler", [1]), ("notes", "x"), ("sample_size", "32")):
        spec_file.write_text(json.dumps({**header, "spec": {**header["spec"], field: value}}))
        with pytest.raises(FastdiffError, match=f"'{field}'"):
            fastdiff.load(path)


def test_a_loaded_torch_file_can_be_saved_over(tmp_path):
    """The weights are read into memory, not mapped from the file: a training run saving its next checkpoint over
    the one loaded changes nothing of the loaded model (a review: they changed with the file, and a shorter file
    killed the process with SIGBUS on the next call)."""
    path = str(tmp_path / "dit.pt")
    model = fastdiff.load("arch:tiny-dit").model
    torch.save(model.state_dict(), path)
    pipe = fastdiff.load(path, num_heads=2)
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    torch.save({k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}, path)  # the same sizes
    assert all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())
    torch.save({"x": torch.zeros(1)}, path)  # a shorter file
    assert torch.isfinite(pipe.generate(seeds=[1], class_labels=[0], steps=2, progress=False)).all()


# ---------------------------------------------------------------------------------------------------------------
# from a review of the loaders (each loaded silently, or failed with a raw Python error, before)
# ---------------------------------------------------------------------------------------------------------------

def _dit_state():
    return fastdiff.load("arch:tiny-dit").model.state_dict()


def test_which_weights_of_a_training_checkpoint_were_read_is_noted(tmp_path):
    sd = _dit_state()
    torch.save({"ema": sd, "model": {k: v * 2 for k, v in sd.items()}}, tmp_path / "both.pt")
    torch.save({"model": sd}, tmp_path / "model.pt")
    both, model = (fastdiff.load(str(tmp_path / n), num_heads=2).spec.notes for n in ("both.pt", "model.pt"))
    assert "the checkpoint's 'ema' weights were loaded (its 'model' not)" in both
    assert "the checkpoint has no 'ema' weights: its 'model' (training) weights were loaded" in model


def test_a_state_dict_with_keys_that_are_no_names_is_corrupt(tmp_path):
    torch.save({**_dit_state(), 1: torch.zeros(1)}, tmp_path / "keys.pt")
    with pytest.raises(CorruptCheckpointError, match="keys are parameter names .* found the key 1 .int."):
        fastdiff.load(str(tmp_path / "keys.pt"))


def test_a_damaged_record_of_a_torch_zip_is_corrupt(tmp_path):
    """torch.load does not check the records' CRC-32: bytes changed in place (not cut short) loaded as altered
    weights."""
    import zipfile

    path = tmp_path / "dit.pt"
    torch.save(_dit_state(), path)
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
    data[start:start + 8] = bytes(b ^ 0xFF for b in data[start:start + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="does not match its CRC-32"):
        fastdiff.load(str(path), num_heads=2)


def test_a_torch_file_saved_without_crcs_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) writes every record's CRC-32 as 0 (a documented option): such a
    file is read, not refused as damaged (a review of the CRC check)."""
    if not hasattr(torch.serialization, "set_crc32_options"):
        pytest.skip(f"torch {torch.__version__} has no set_crc32_options")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(_dit_state(), tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert fastdiff.load(str(tmp_path / "nocrc.pt"), num_heads=2).spec.kind == "dit"


def test_a_cast_that_overflows_the_asked_dtype_is_refused(tmp_path):
    sd = _dit_state()
    name = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() == 2)
    sd[name] = sd[name].clone()
    sd[name][0, 0] = 1e5  # finite in float32, beyond float16's 65504
    torch.save(sd, tmp_path / "big.pt")
    with pytest.raises(fastdiff.errors.BadArgumentError, match=f"dtype=torch.float16: .*{name}"):
        fastdiff.load(str(tmp_path / "big.pt"), num_heads=2, dtype=torch.float16)
    assert fastdiff.load(str(tmp_path / "big.pt"), num_heads=2, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_a_string_where_a_boolean_goes_is_refused(tmp_path):
    from fastdiff.checkpoints.controlnet import controlnet_config
    from fastdiff.checkpoints.dit import dit_config_from_diffusers
    from fastdiff.errors import UnsupportedConfigError

    dit = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
               sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with pytest.raises(UnsupportedConfigError, match="'attention_bias' = 'false'"):
        dit_config_from_diffusers({**dit, "attention_bias": "false"})
    unet = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                cross_attention_dim=32, norm_num_groups=8, layers_per_block=1, attention_head_dim=8)
    controlnet_config(unet)
    with pytest.raises(UnsupportedConfigError, match="'global_pool_conditions' = 'false'"):
        controlnet_config({**unet, "global_pool_conditions": "false"})


def test_an_attention_tensor_named_in_both_diffusers_layouts_is_refused():
    from fastdiff.checkpoints.diffusers_unet import convert_diffusers_unet

    t = torch.zeros(2, 2)
    assert set(convert_diffusers_unet({"mid_block.attentions.0.query.weight": t})) == {
        "mid_block.attentions.0.to_q.weight"}
    with pytest.raises(CheckpointError, match="current and pre-0.14 names"):
        convert_diffusers_unet({"mid_block.attentions.0.query.weight": t, "mid_block.attentions.0.to_q.weight": t})


@pytest.mark.parametrize("change,error", [(dict(num_train_timesteps="1000"), "'num_train_timesteps' = '1000'"),
                                          (dict(beta_end="0.02"), "'beta_end' = '0.02'"),
                                          (dict(clip_sample="false"), "'clip_sample' = 'false'")])
def test_a_scheduler_config_with_a_value_of_the_wrong_type_is_refused_at_load(tmp_path, change, error):
    """They loaded, then generate() failed with torch's TypeError (or read "false" as True)."""
    from fastdiff.errors import UnsupportedConfigError

    ddim = dict(_class_name="DDIMScheduler", beta_schedule="linear", num_train_timesteps=1000)
    with pytest.raises(UnsupportedConfigError, match=error):
        fastdiff.load("arch:tiny-unet", scheduler={**ddim, **change})


def test_the_load_check_of_a_scheduler_config_notes_nothing_that_runs():
    """The check's trial plan: the identity shift for a linear dynamic shift (mu 0 made NaN times), no mu for a class
    that drops use_dynamic_shifting, no more steps than an LCM config was distilled at (a review)."""
    from fastdiff.scheduler_checks import check_scheduler_config

    for config in ({"_class_name": "EulerDiscreteScheduler", "use_dynamic_shifting": True},
                   {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
                    "time_shift_type": "linear"},
                   {"_class_name": "LCMScheduler", "original_inference_steps": 2}):
        assert check_scheduler_config(config) == [], config


def test_a_pipeline_folders_scheduler_config_is_checked_at_load(tmp_path):
    """A pipeline folder's scheduler_config.json: wrong types refused, a typo'd key and a choice no plan takes noted
    (diffusers ignores unknown keys; with sampler= the model still samples)."""
    import re

    from fastdiff.errors import UnsupportedConfigError

    src = str(tmp_path / "pipe")
    pipe = diffusers.DDPMPipeline(unet=perturb_(diffusers.UNet2DModel(**TINY).eval(), seed=1),
                                  scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(src)
    config_path = os.path.join(src, "scheduler", "scheduler_config.json")
    config = json.loads(open(config_path).read())
    for change, expect in ((dict(beta_shedule="linear"), "keys no scheduler reads .* \\['beta_shedule'\\]"),
                           (dict(timestep_spacing="middle"), "cannot run as it is: .*'timestep_spacing' = 'middle'")):
        with open(config_path, "w") as f:
            json.dump({**config, **change}, f)
        notes = fastdiff.load(src).spec.notes
        assert any(re.search(expect, n) for n in notes), notes
    with open(config_path, "w") as f:
        json.dump({**config, "steps_offset": "1"}, f)
    with pytest.raises(UnsupportedConfigError, match="'steps_offset' = '1'"):
        fastdiff.load(src)


def test_keys_of_no_single_file_part_and_its_ema_weights_are_noted(tmp_path):
    from fastdiff.checkpoints.ldm import single_file_notes

    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "first_stage_model.x": torch.zeros(1),
             "cond_stage_model.y": torch.zeros(1), "betas": torch.zeros(1), "model_ema.decay": torch.zeros(1),
             "control_model.input_blocks.0.0.weight": torch.zeros(1), "junk": torch.zeros(1)}
    notes = single_file_notes(state)
    assert any("EMA weights too (model_ema.*)" in n for n in notes)
    assert any("control_model.* (1), junk" in n for n in notes)
    assert single_file_notes({k: v for k, v in state.items() if k not in ("model_ema.decay", "control_model."
                                                                          "input_blocks.0.0.weight", "junk")}) == []
