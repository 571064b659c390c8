"""bench/inductor_pretune.py: the diffusers model of a bench run compiled (and so autotuned on a GPU) ahead of the
timed run, with the bench's own flags, into the Inductor cache folder the timed run reads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import inductor_pretune  # noqa: E402


def _stub_rows(monkeypatch, compiled_status="ok"):
    from fastdiff.commands import bench_diffusers

    calls = []

    def rows(args, source, compare, batches, device, log, on_row=None):
        calls.append(dict(args=args, source=source, compare=compare, batches=batches, device=device))
        return [dict(impl=i, batch=b, status=s, first_call_s=1.5, **({"reason": "boom"} if s != "ok" else {}))
                for i, s in (("diffusers", "ok"), ("diffusers+compile", compiled_status)) for b in batches]

    monkeypatch.setattr(bench_diffusers, "_bench_diffusers", rows)
    return calls


def test_the_bench_flags_reach_the_compiled_diffusers_run(monkeypatch, capsys):
    calls = _stub_rows(monkeypatch)
    rc = inductor_pretune.main(["arch:tiny-sd-unet", "--cfg", "7.5", "--dtype", "fp16", "--steps", "20", "--sampler",
                                "dpmpp_2m", "--batch", "1,2", "--compile-mode", "reduce-overhead", "--warmup", "5",
                                "--repeat", "10", "--device", "cpu"])
    assert rc == 0
    (call,) = calls
    args = call["args"]
    assert call["source"] == "arch:tiny-sd-unet" and call["compare"] == ["diffusers", "compile"]
    assert call["batches"] == [1, 2] and str(call["device"]) == "cpu"
    assert (args.cfg, args.dtype, args.steps, args.sampler, args.compile_mode) == (
        7.5, "fp16", 20, "dpmpp_2m", "reduce-overhead")
    assert (args.warmup, args.repeat) == (1, 1)  # the compile and one call after it: nothing to time
    out = capsys.readouterr().out
    assert "diffusers+compile  batch 2: ok, first call 1.5 s" in out


def test_a_failed_compile_fails_the_script(monkeypatch, capsys):
    _stub_rows(monkeypatch, compiled_status="failed")
    assert inductor_pretune.main(["arch:tiny-dit", "--device", "cpu"]) == 1
    assert "diffusers+compile  batch 1: failed, first call 1.5 s (boom)" in capsys.readouterr().out


def test_compare_is_refused(monkeypatch):
    _stub_rows(monkeypatch)
    with pytest.raises(SystemExit) as e:
        inductor_pretune.main(["arch:tiny-dit", "--compare", "diffusers"])
    assert e.value.code == 2


@pytest.mark.slow
def test_a_real_compile_fills_the_given_inductor_cache(tmp_path):
    """On the CPU: torch.compile(mode="default") of diffusers' DiT, its compiled graph in TORCHINDUCTOR_CACHE_DIR
    (where gpu_check.sh's timed stage then finds it), in a process of its own (Dynamo's state stays there)."""
    cache = tmp_path / "inductor"
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, str(BENCH / "inductor_pretune.py"), "arch:tiny-dit", "--steps", "1",
                        "--cfg", "2", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "diffusers+compile  batch 1: ok" in p.stdout
    assert any((cache / "fxgraph").rglob("*")), "the compiled graph is not in the given cache folder"
