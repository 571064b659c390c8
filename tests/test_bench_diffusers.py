"""``fastdiff bench --compare diffusers`` rebuilds the same weights as a diffusers model: the rebuilt model must
be the same network (same outputs), or the comparison times something else."""

import pytest
import torch

import fastdiff
from helpers import rel_err

pytest.importorskip("diffusers", reason="diffusers is needed for the comparison")


@pytest.mark.parametrize("arch", ["tiny-unet", "tiny-sd-unet", "tiny-sdxl-unet", "tiny-dit"])
def test_diffusers_counterpart_holds_the_same_network(arch):
    from fastdiff.commands.bench import build_diffusers_model

    pipe = fastdiff.load(f"arch:{arch}")
    for p in pipe.model.parameters():  # random weights everywhere (some inits are zero)
        p.data.normal_(0, 0.05)
    model, note = build_diffusers_model(pipe)
    spec = pipe.spec
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, spec.in_channels) + tuple(spec.sample_size), generator=g)
    t = torch.tensor([10.0, 500.0])
    kw, dkw = {}, {}
    if spec.num_classes:
        kw["class_labels"] = dkw["class_labels"] = torch.tensor([1, 3])
    if spec.cross_attention_dim:
        kw["encoder_hidden_states"] = dkw["encoder_hidden_states"] = torch.randn(2, 7, spec.cross_attention_dim,
                                                                                generator=g)
    if spec.time_ids_dim:  # SDXL: diffusers takes the pooled text and ids as added_cond_kwargs
        kw["text_embeds"] = torch.randn(2, spec.text_embeds_dim, generator=g)
        kw["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96.0, 64, 8, 0, 64, 64]])
        dkw["added_cond_kwargs"] = dict(text_embeds=kw["text_embeds"], time_ids=kw["time_ids"])
    with torch.no_grad():
        want = pipe.model(x, t, **kw)
        got = model(x, t, **dkw).sample
    if note:  # DiT: diffusers embeds timesteps with another frequency shift; same shapes and FLOPs
        assert "frequency shift" in note and got.shape == want.shape
    else:
        assert rel_err(got, want) <= 1e-5
