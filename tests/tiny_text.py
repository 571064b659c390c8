"""Tiny tokenizers and text encoders written to disk, in the layout of a diffusers pipeline folder (no model hub):
a byte-level BPE CLIP tokenizer, a Unigram T5 tokenizer, and random transformers CLIP / T5 encoders."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import perturb_

WORDS = ("a", "cat", "dog", "and", "the", "red", "photo", "of")


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-level BPE's printable stand-in for each of the 256 bytes."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(folder: str, pad_token: str = "<|endoftext|>", max_length: int = 77) -> str:
    """A CLIP tokenizer with every byte, and a few whole words merged (so prompts differ in length)."""
    transformers = pytest.importorskip("transformers", reason="the text encoders are transformers' classes")
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:  # merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    src = folder + "_src"
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(src, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = transformers.CLIPTokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"),
                                     pad_token=pad_token, model_max_length=max_length)
    tok.save_pretrained(folder)
    return folder


def write_t5_tokenizer(folder: str, max_length: int = 512) -> str:
    """A T5 (Unigram, sentencepiece-style) tokenizer: whole words, letters, and '</s>' appended."""
    transformers = pytest.importorskip("transformers", reason="the text encoders are transformers' classes")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    cls = getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer
    cls(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
        model_max_length=max_length).save_pretrained(folder)
    return folder


def clip_encoder(hidden: int, projection: int | None = None, seed: int = 0, layers: int = 3):
    """A random CLIP text encoder (with a projection when ``projection`` is given); vocab of write_clip_tokenizer."""
    transformers = pytest.importorskip("transformers", reason="the text encoders are transformers' classes")
    config = transformers.CLIPTextConfig(vocab_size=600, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                                         projection_dim=projection or hidden, bos_token_id=0, eos_token_id=2,
                                         pad_token_id=1)
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return perturb_(cls(config).eval(), seed, std=0.2)


def t5_encoder(d_model: int, seed: int = 0):
    transformers = pytest.importorskip("transformers", reason="the text encoders are transformers' classes")
    config = transformers.T5Config(vocab_size=64, d_model=d_model, d_kv=4, d_ff=2 * d_model, num_layers=2,
                                   num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return perturb_(transformers.T5EncoderModel(config).eval(), seed, std=0.2)
