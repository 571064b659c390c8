"""Textual inversion (``pipe.load_textual_inversion``) against diffusers' ``load_textual_inversion`` on the same tiny
SD / SDXL pipelines: single- and multi-vector tokens, diffusers' / A1111's / safetensors / SDXL clip_l + clip_g files,
prompts and negative prompts naming them; and the refusals."""

import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from fastdiff.errors import BadArgumentError, CheckpointError
from helpers import rel_err
from test_prompts import _save, _sdxl_pipe, sd_pipelines

diffusers = pytest.importorskip("diffusers", reason="diffusers' load_textual_inversion is the reference")
pytest.importorskip("transformers", reason="the text encoders are transformers' classes")

PROMPTS = ["a photo of <toy> and a cat", "the <toy> dog"]


def _vectors(n, width, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n, layout", [(1, "diffusers"), (3, "diffusers"), (2, "a1111"), (3, "safetensors")])
def test_sd_textual_inversion_equals_diffusers(tmp_path, n, layout):
    """One or several vectors; the token in prompts and in the negative prompt; the file as each tool writes it."""
    ref, pipe = sd_pipelines(str(tmp_path))
    vectors = _vectors(n, 16)
    if layout == "diffusers":
        path = str(tmp_path / "toy.bin")
        torch.save({"<toy>": vectors}, path)
    elif layout == "a1111":
        path = str(tmp_path / "toy.pt")
        torch.save({"string_to_param": {"*": vectors}, "name": "<toy>", "step": 3000}, path)
    else:
        path = str(tmp_path / "toy.safetensors")
        save_file({"emb_params": vectors}, path)
    token = "<toy>" if layout == "safetensors" else None  # (emb_params names no token)
    ref.load_textual_inversion(path, token=token)
    report = pipe.load_textual_inversion(path, token=token)
    assert report == {"text_encoder": {"<toy>": n}}
    want, want_neg = ref.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["<toy>", "a dog"])
    got = pipe.encode_prompt(PROMPTS, ["<toy>", "a dog"], guided=True)
    assert rel_err(got["encoder_hidden_states"], want) <= 1e-5
    assert rel_err(got["negative_encoder_hidden_states"], want_neg) <= 1e-5
    plain = pipe.encode_prompt(["a photo of a cat and a cat", "the a dog"])["encoder_hidden_states"]
    assert rel_err(got["encoder_hidden_states"], plain) > 1e-3  # (the vectors reached the states)


def test_sdxl_pair_file_fills_both_encoders_as_two_diffusers_loads(tmp_path):
    """An SDXL embedding (clip_l, clip_g): diffusers loads it with two calls, one per tokenizer / encoder."""
    ref = _sdxl_pipe(str(tmp_path))
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    state = {"clip_l": _vectors(2, 8, 1), "clip_g": _vectors(2, 4, 2)}
    save_file(state, str(tmp_path / "toy.safetensors"))
    ref.load_textual_inversion(state["clip_l"], token="<toy>", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="<toy>", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    assert pipe.load_textual_inversion(str(tmp_path / "toy.safetensors"), token="<toy>") == {
        "text_encoder": {"<toy>": 2}, "text_encoder_2": {"<toy>": 2}}
    want = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt="<toy> dog")
    got = pipe.encode_prompt(PROMPTS, "<toy> dog", guided=True)
    for name, w in zip(("encoder_hidden_states", "negative_encoder_hidden_states", "text_embeds",
                        "negative_text_embeds"), want):
        assert rel_err(got[name], w) <= 1e-5, name


def test_tokens_survive_a_reload_and_unload_drops_them(tmp_path):
    """The encoders read anew (another precision, unload_lora) keep the tokens; unload_textual_inversion drops them,
    and a save refuses while they are there (it copies the tokenizer folders as they are on disk)."""
    _, pipe = sd_pipelines(str(tmp_path))
    plain = pipe.encode_prompt(PROMPTS)["encoder_hidden_states"]
    pipe.load_textual_inversion({"<toy>": _vectors(2, 16)})
    with_toy = pipe.encode_prompt(PROMPTS)["encoder_hidden_states"]
    pipe.prompt_encoder.to(dtype=torch.float64)
    pipe.prompt_encoder.to(dtype=torch.float32)  # (read again from the folder)
    assert rel_err(pipe.encode_prompt(PROMPTS)["encoder_hidden_states"], with_toy) <= 1e-6
    with pytest.raises(BadArgumentError, match="save\\(\\): the tokenizers carry textual inversion tokens"):
        pipe.save(str(tmp_path / "saved"))
    pipe.unload_textual_inversion()
    assert torch.equal(pipe.encode_prompt(PROMPTS)["encoder_hidden_states"], plain)
    pipe.load_textual_inversion({"<toy>": _vectors(2, 16)})  # (the token is free again)


def test_bad_embeddings_are_refused_by_name(tmp_path):
    _, pipe = sd_pipelines(str(tmp_path))
    torch.save({"<toy>": _vectors(1, 16)}, str(tmp_path / "ok.bin"))
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    cases = [
        ({"<toy>": _vectors(1, 7)}, {}, "its vectors are 7 wide and text_encoder's token embeddings 16"),
        (_vectors(1, 16), {}, "a bare tensor names no token"),
        ({"a": _vectors(1, 16), "b": _vectors(1, 16)}, {}, "expected one token's embedding"),
        ({"<toy>": torch.full((1, 16), float("nan"))}, {}, "NaN or inf"),
        ({"cat</w>": _vectors(1, 16)}, {}, r"\['cat</w>'\] already in text_encoder's tokenizer"),
        ({"<toy>": _vectors(1, 16)}, dict(text_encoder="text_encoder_2"), "expected one of this pipeline's"),
        (str(tmp_path / "missing.bin"), {}, "no such textual inversion file"),
        (str(tmp_path / "junk.bin"), {}, "not a readable textual inversion embedding"),
    ]
    for source, kw, match in cases:
        with pytest.raises((BadArgumentError, CheckpointError), match=match):
            pipe.load_textual_inversion(source, **kw)
    pipe.load_textual_inversion(str(tmp_path / "ok.bin"))
    with pytest.raises(BadArgumentError, match=r"\['<toy>'\] already in"):
        pipe.load_textual_inversion(str(tmp_path / "ok.bin"))
    with pytest.raises(BadArgumentError, match="encodes no prompts"):
        fastdiff.load("arch:tiny-dit").load_textual_inversion(str(tmp_path / "ok.bin"))


def test_cli_generate_reads_textual_inversions(tmp_path):
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli

    _, pipe = sd_pipelines(str(tmp_path))
    save_file({"emb_params": _vectors(2, 16)}, str(tmp_path / "toy.safetensors"))
    r = run_cli("generate", str(tmp_path / "pipe"), "--prompt", "a <toy> cat", "--textual-inversion",
                f"{tmp_path / 'toy.safetensors'}:<toy>", "--steps", "2", "--output-latents", "out.safetensors",
                "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pipe.load_textual_inversion(str(tmp_path / "toy.safetensors"), token="<toy>")
    want = pipe.generate(prompt="a <toy> cat", seeds=[0], steps=2, progress=False)
    assert rel_err(load_file(str(tmp_path / "out.safetensors"))["latents"][:1], want) <= 1e-5  # (image 0)
    r = run_cli("generate", str(tmp_path / "pipe"), "--prompt", "a cat", "--textual-inversion", "nope.bin:<t>",
                "--steps", "1", "--output-latents", "x.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "--textual-inversion: expected an embedding file[:TOKEN]" in r.stderr


def test_a_refused_pair_adds_nothing_and_the_callers_tensor_stays_its_own(tmp_path):
    """An SDXL pair whose second half does not fit is refused whole (its first half was added, and the token taken);
    the vectors are copied (a caller zeroing its tensor changed the tokens at the next reload)."""
    ref = _sdxl_pipe(str(tmp_path))
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    with pytest.raises(BadArgumentError, match="5 wide and text_encoder_2's token embeddings 4"):
        pipe.load_textual_inversion({"clip_l": _vectors(2, 8), "clip_g": _vectors(2, 5)}, token="<toy>")
    assert pipe.prompt_encoder.embeddings == []
    vectors = _vectors(2, 8, 3)
    pipe.load_textual_inversion({"clip_l": vectors, "clip_g": _vectors(2, 4)}, token="<toy>")
    before = pipe.encode_prompt(PROMPTS)["encoder_hidden_states"]
    vectors.mul_(0)
    pipe.prompt_encoder.to(dtype=torch.float64)
    pipe.prompt_encoder.to(dtype=torch.float32)  # (read again, the tokens added again)
    assert rel_err(pipe.encode_prompt(PROMPTS)["encoder_hidden_states"], before) <= 1e-6


def test_a_concept_folder_and_a_safetensors_file_of_any_name(tmp_path):
    """diffusers' concept folder (learned_embeds.bin, sd-concepts-library's layout) and a safetensors file named
    .bin load as diffusers loads them."""
    ref, pipe = sd_pipelines(str(tmp_path))
    (tmp_path / "concept").mkdir()
    torch.save({"<toy>": _vectors(2, 16)}, str(tmp_path / "concept" / "learned_embeds.bin"))
    save_file({"<cup>": _vectors(1, 16, 5)}, str(tmp_path / "cup.bin"))
    for source in (str(tmp_path / "concept"), str(tmp_path / "cup.bin")):
        ref.load_textual_inversion(source)
        pipe.load_textual_inversion(source)
    prompts = ["a <toy> and a <cup>", "the <cup> dog"]
    want = ref.encode_prompt(prompts, "cpu", 1, False)[0]
    assert rel_err(pipe.encode_prompt(prompts)["encoder_hidden_states"], want) <= 1e-5
    with pytest.raises(CheckpointError, match="a folder without learned_embeds.safetensors or learned_embeds.bin"):
        pipe.load_textual_inversion(str(tmp_path))

