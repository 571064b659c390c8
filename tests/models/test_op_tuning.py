"""kernel_ops="tune": each fused layer times its implementations on its first call and keeps the fastest.

On the CPU the device-time timer is replaced by a stand-in that returns set times per backend, so the choice,
the sharing of a measurement between layers of one problem and the fallbacks are checked; the kernels
themselves run (interpreter) and must give the native result.
"""

import json
import os

import pytest
import torch

import fastdiff
from fastdiff.models import op_tuning
from fastdiff.models.layers import op_backends, set_backend
from helpers import rel_err

pytest.importorskip("triton", reason="the fused path needs triton (CPU interpreter here)")

# seconds per (layer class, backend): GroupNorm fastest on the rows strategy, attention on torch, the DiT ops
# on Triton
TIMES = {"GroupNorm": {"native": 3.0, "triton": 2.0, "triton_rows": 1.0},
         "Attention": {"native": 1.0, "triton": 2.0},
         "ModulatedLayerNorm": {"native": 2.0, "triton": 1.0, "triton_pair": 1.5},
         "GEGLU": {"native": 1.0, "triton": 2.0},
         "LayerNorm": {"native": 1.0, "triton": 2.0}}


@pytest.fixture
def timer(monkeypatch):
    op_tuning.clear()
    calls = []

    def fake(fn, backend, module):
        fn()  # the candidate must run
        calls.append((type(module).__name__, backend))
        return TIMES[type(module).__name__][backend]

    monkeypatch.setattr(op_tuning, "TIMER", fake)
    yield calls
    op_tuning.clear()


def test_tuned_layers_keep_the_fastest_backend(timer):
    pipe = fastdiff.load("arch:tiny-sd-unet")
    model = pipe.model
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([17, 900]), torch.randn(2, 7, 32)
    with torch.no_grad():
        native = model(x, t, encoder_hidden_states=ctx)
        set_backend(model, "triton", ops={"group_norm": "tune", "attention": "tune", "geglu": "tune",
                                          "layer_norm": "tune"})
        assert set(op_backends(model).values()) == {"tune"}
        tuned = model(x, t, encoder_hidden_states=ctx)
        assert op_backends(model) == {"GroupNorm": "triton_rows", "Attention": "native", "GEGLU": "native",
                                      "LayerNorm": "native"}
        calls = len(timer)
        again = model(x, t, encoder_hidden_states=ctx)  # decided: nothing is measured again
    assert len(timer) == calls
    assert rel_err(tuned, native) <= 1e-4 and rel_err(again, native) <= 1e-4
    # one measurement per problem, shared by the layers that have it: far fewer than layers x backends
    norms = [m for m in model.modules() if type(m).__name__ == "GroupNorm"]
    measured = [c for c in timer if c[0] == "GroupNorm"]
    assert len(measured) % 3 == 0 and len(measured) // 3 < len(norms)
    assert norms[0].tune_times == TIMES["GroupNorm"]


def test_a_failing_candidate_is_skipped(timer, monkeypatch):
    def fussy(fn, backend, module):
        if backend == "triton":
            raise RuntimeError("this kernel cannot run this problem")
        return {"native": 2.0, "triton_rows": 5.0}.get(backend, 1.0)

    monkeypatch.setattr(op_tuning, "TIMER", fussy)
    from fastdiff.models.layers import GroupNorm

    gn = GroupNorm(2, 4, activation="silu")
    gn.set_backend("tune", "triton")
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(gn(x), gn.forward_native(x), rtol=1e-4, atol=1e-4)
    assert list(gn.tune_choices.values()) == ["native"] and set(gn.tune_times) == {"native", "triton_rows"}


def test_nothing_to_measure_takes_the_fallback(monkeypatch):
    """No stand-in timer and a CPU input: the default timer needs a GPU, so the fallback runs."""
    op_tuning.clear()
    monkeypatch.setattr(op_tuning, "TIMER", None)
    from fastdiff.models.layers import GroupNorm

    gn = GroupNorm(2, 4)
    gn.set_backend("tune", "triton_rows")
    ran = []
    monkeypatch.setattr(GroupNorm, "forward_triton_rows", lambda self, x, *a, **k: ran.append(1) or x)
    gn(torch.randn(1, 4, 3, 3))
    assert ran == [1] and "tune_choices" not in gn.__dict__
    assert op_backends(gn) == {"GroupNorm": "triton_rows (untuned)"}


def test_layer_settings_and_new_shapes_are_new_problems(timer):
    from fastdiff.models.layers import GroupNorm

    layers = [GroupNorm(2, 4, activation="silu"), GroupNorm(2, 4), GroupNorm(4, 4, activation="silu"),
              GroupNorm(2, 4, activation="silu")]
    for m in layers:
        m.set_backend("tune", "triton")
    x = torch.randn(1, 4, 3, 3)
    for m in layers:
        m(x)
    assert len(timer) == 3 * 3  # three distinct problems x three candidates; the last layer shares the first's
    layers[0](torch.randn(2, 4, 3, 3))  # another batch: measured again
    assert len(timer) == 4 * 3 and set(layers[0].tune_choices.values()) == {"triton_rows"}


def test_the_fallback_stays_unless_clearly_beaten(timer, monkeypatch):
    from fastdiff.models.layers import GEGLU

    monkeypatch.setattr(op_tuning, "TIMER", lambda fn, backend, module: {"native": 0.99, "triton": 1.0}[backend])
    m = GEGLU()
    m.set_backend("tune", "triton")
    m(torch.randn(2, 3, 8))
    assert op_backends(m) == {"GEGLU": "triton"}  # 1% faster is within the margin


def test_pipeline_tune_config(timer):
    pipe = fastdiff.load("arch:tiny-dit")
    eager = fastdiff.load("arch:tiny-dit").generate(seeds=[1], class_labels=[2], steps=2, progress=False)
    pipe.optimize(backend="triton", kernel_ops="tune")
    got = pipe.generate(seeds=[1], class_labels=[2], steps=2, progress=False)
    assert op_backends(pipe.model) == {"ModulatedLayerNorm": "triton", "Attention": "native"}
    assert rel_err(got, eager) <= 1e-4
    with pytest.raises(fastdiff.BadArgumentError, match="sampler_update takes one of"):
        fastdiff.OptimizeConfig(backend="triton", kernel_ops={"sampler_update": "tune"})


def test_op_backends_reports_per_layer_mixtures():
    from fastdiff.models.layers import GroupNorm

    model = torch.nn.Sequential(GroupNorm(2, 4), GroupNorm(2, 4), GroupNorm(2, 4))
    model[0].set_backend("native")
    for m in model[1:]:
        m.set_backend("triton")
    assert op_backends(model) == {"GroupNorm": "native x1, triton x2"}
    model[0].set_backend("triton")
    assert op_backends(model) == {"GroupNorm": "triton"}


def test_timing_cache_round_trip(timer, tmp_path, monkeypatch):
    """Measurements are saved after they are made and read back by the next pipeline, on this machine only."""
    path = str(tmp_path / "tune.json")
    kw = dict(seeds=[1], class_labels=[2], steps=2, progress=False)
    pipe = fastdiff.load("arch:tiny-dit").optimize(backend="triton", kernel_ops="tune", tune_cache=path)
    assert "not there yet" in pipe.notes[-1]
    want = pipe.generate(**kw)
    measured = len(timer)
    assert measured and os.path.exists(path)

    op_tuning.clear()  # a new process
    again = fastdiff.load("arch:tiny-dit").optimize(backend="triton", kernel_ops="tune", tune_cache=path)
    assert "measured problems read" in again.notes[-1]
    torch.testing.assert_close(again.generate(**kw), want)
    assert len(timer) == measured  # nothing measured again
    assert op_backends(again.model) == op_backends(pipe.model)

    op_tuning.clear()  # another GPU: the file is ignored and overwritten with this machine's
    monkeypatch.setattr(op_tuning, "fingerprint", lambda: {"device": "another GPU"})
    other = fastdiff.load("arch:tiny-dit").optimize(backend="triton", kernel_ops="tune", tune_cache=path)
    assert "another machine" in other.notes[-1]
    other.generate(**kw)
    assert len(timer) == 2 * measured

    for text in ("[1, 2]", '{"fingerprint": 1, "choices": [3]}'):  # JSON, but not a timing cache
        (tmp_path / "odd.json").write_text(text)
        assert "unreadable" in op_tuning.load_cache(str(tmp_path / "odd.json"))
    good = json.loads(open(path).read())
    good["fingerprint"] = op_tuning.fingerprint()
    good["choices"]["damaged"] = ["triton"]  # one bad entry among good ones: skipped
    (tmp_path / "mixed.json").write_text(json.dumps(good))
    assert f"{len(good['choices']) - 1} measured problems read" in op_tuning.load_cache(str(tmp_path / "mixed.json"))

    (tmp_path / "bad.json").write_text("{not json")
    bad = fastdiff.load("arch:tiny-dit").optimize(backend="triton", kernel_ops="tune",
                                                  tune_cache=str(tmp_path / "bad.json"))
    assert "unreadable" in bad.notes[-1]
    with pytest.raises(fastdiff.BadArgumentError, match="tune_cache needs"):
        fastdiff.OptimizeConfig(backend="triton", tune_cache=path)
    with pytest.raises(fastdiff.BadArgumentError, match="existing folder"):
        fastdiff.OptimizeConfig(backend="triton", kernel_ops="tune", tune_cache=str(tmp_path / "no" / "t.json"))


def test_an_unwritable_cache_warns_once_and_generation_goes_on(timer, tmp_path, monkeypatch):
    def refuse(path):
        raise OSError("read-only file system")

    monkeypatch.setattr(op_tuning, "save_cache", refuse)
    monkeypatch.setattr(op_tuning, "_save_failed", [])
    pipe = fastdiff.load("arch:tiny-dit").optimize(backend="triton", kernel_ops="tune",
                                                   tune_cache=str(tmp_path / "t.json"))
    with pytest.warns(UserWarning, match="cannot be written") as record:
        pipe.generate(seeds=[1], class_labels=[2], steps=2, progress=False)
    assert len([w for w in record if "cannot be written" in str(w.message)]) == 1


def test_a_capture_after_the_warm_up_replays_the_measured_choice(timer, monkeypatch):
    """The warm-up call measures; the capture that follows (where nothing can be measured) must record the
    kernel that was chosen, not the fallback."""
    from fastdiff.models.layers import ModulatedLayerNorm

    m = ModulatedLayerNorm(8)
    m.set_backend("tune", "native")  # fallback native; the stand-in times make Triton the clear winner
    args = (torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8))
    m(*args)
    assert list(m.tune_choices.values()) == ["triton"]
    monkeypatch.setattr(op_tuning, "TIMER", None)  # now nothing can be measured (as inside a capture)
    ran = []
    monkeypatch.setattr(ModulatedLayerNorm, "forward_triton", lambda self, *a: ran.append("triton") or a[0])
    monkeypatch.setattr(ModulatedLayerNorm, "forward_native", lambda self, *a: ran.append("native") or a[0])
    m(*args)
    m(torch.randn(4, 3, 8), torch.randn(4, 8), torch.randn(4, 8))  # a new problem: the fallback
    assert ran == ["triton", "native"]


def test_tuning_an_upcast_attention_times_each_candidate_as_it_runs(monkeypatch):
    """SD 2.x's upcast_attention casts for torch's SDPA only: under kernel_ops="tune" torch's candidate is timed on
    float32 copies and the Triton one on the half-precision inputs (the cast used to come before the choice, so
    every candidate was timed, and the Triton one chosen ran, in float32)."""
    from fastdiff.models.unet import MultiHeadAttention

    op_tuning.clear()
    seen = []

    def record(name):
        def run(self, q, k, v, scale=None):
            seen.append((name, q.dtype))
            return q.clone()
        return run

    def timer(fn, backend, module):
        fn()
        return {"native": 2.0, "triton": 1.0}[backend]

    monkeypatch.setattr(op_tuning, "TIMER", timer)
    monkeypatch.setattr(op_tuning, "candidates", lambda module, args, kwargs: ["native", "triton"])
    attn = MultiHeadAttention(16, heads=2, head_dim=8, upcast=True)
    attn.core.set_backend("tune")
    for name in ("native", "triton"):
        monkeypatch.setattr(type(attn.core), "forward_" + name, record(name))
    q = k = v = torch.randn(1, 2, 5, 8, dtype=torch.float16)
    try:
        out = attn._attend(1, q, k, v)
        assert seen == [("native", torch.float32), ("triton", torch.float16), ("triton", torch.float16)]
        assert out.dtype == torch.float16
        assert attn.core.tune_choices and set(attn.core.tune_choices.values()) == {"triton"}
        seen.clear()
        attn.upcast = False  # another problem: measured again, torch's candidate now in half precision
        attn._attend(1, q, k, v)
        assert seen[0] == ("native", torch.float16)
        assert attn.core.tune_key() == (None,)  # (without the upcast: the key a cache written before it holds)
    finally:
        op_tuning.clear()
