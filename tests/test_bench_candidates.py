"""The kernel benches' candidates compute the same thing, and their sweeps call the launchers with valid
knobs: checked here on tiny CPU tensors (Triton interpreter), so a GPU run's minutes are not spent on a bench
that breaks. Timing itself needs a GPU and is replaced by a stand-in."""

import itertools
import os
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the kernels run on the Triton interpreter here")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import bench_adaln  # noqa: E402
import bench_attention  # noqa: E402
import bench_geglu  # noqa: E402
import bench_group_norm  # noqa: E402
import bench_sampler_update  # noqa: E402


def assert_all_agree(fns: dict, base: str, tol: float):
    want = fns[base]().float()
    for name, fn in fns.items():
        torch.testing.assert_close(fn().float(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_candidates(layout):
    x, w, b = (torch.randn(2, 8, 5, 6) + 0.5), torch.randn(8), torch.randn(8)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    fns = bench_group_norm.candidates(x, 4, w, b)
    assert {"torch", "triton", "triton/1", "triton/4", "triton rows"} <= set(fns)
    assert_all_agree(fns, "torch", 1e-4)


def cpu_inputs(shape, dtype, layout):
    """bench_group_norm.inputs on the CPU, in float32."""
    x = torch.randn(shape) + 0.5
    return (x.to(memory_format=torch.channels_last) if layout == "channels_last" else x,
            torch.randn(shape[1]), torch.randn(shape[1]))


def test_group_norm_sweep_runs_every_configuration(monkeypatch):
    monkeypatch.setattr(bench_group_norm, "SWEEP_SHAPE", ((1, 8, 4, 4), 4))
    outputs = []
    monkeypatch.setattr(bench_group_norm, "inputs", cpu_inputs)
    monkeypatch.setattr(bench_group_norm, "time_cuda",
                        lambda fn, iters, flush: (outputs.append(fn()), (1e-3, 2e-3))[1])
    rows = bench_group_norm.sweep(torch.float32, iters=1)
    per_layout = 1 + sum(len(list(itertools.product(*k.values()))) for k in bench_group_norm.SWEEP.values())
    assert len(rows) == 2 * per_layout and all(r["speedup"] == 1.0 for r in rows)
    assert all(torch.isfinite(o).all() for o in outputs)


def test_group_norm_rows_compare_with_a_copy_of_the_same_bytes(monkeypatch):
    monkeypatch.setattr(bench_group_norm, "SHAPES", [((1, 8, 4, 5), 4)])
    monkeypatch.setattr(bench_group_norm, "inputs", cpu_inputs)
    copies = []

    def stand_in_timing(fn, iters, flush):  # the copy "takes" 1 ms, each GroupNorm 4 ms
        out = fn()
        if "copy_reference" in fn.__qualname__:
            copies.append(out)
            return 1e-3, 1e-3
        return 4e-3, 4e-3

    monkeypatch.setattr(bench_group_norm, "time_cuda", stand_in_timing)
    rows = bench_group_norm.run((torch.float32,), iters=1)
    assert len(copies) == 2 * 2  # cold + hot, per layout
    for layout in ("nchw", "channels_last"):  # the copy keeps x's layout and values
        x = cpu_inputs((1, 8, 4, 5), None, layout)[0]
        out = bench_group_norm.copy_reference(x)()
        assert torch.equal(out, x) and out.stride() == x.stride()
    by_impl = {(r["layout"], r["impl"]): r for r in rows}
    assert by_impl["nchw", "copy"]["of_copy"] == 1.0 and by_impl["nchw", "copy"]["speedup"] == 4.0
    assert by_impl["channels_last", "triton"]["of_copy"] == by_impl["nchw", "torch"]["of_copy"] == 0.25


def test_attention_candidates():
    q, k, v = (torch.randn(1, 2, n, 40) for n in (9, 13, 13))
    fns = bench_attention.candidates(q, k, v, pinned=("flash", "math"))  # the backends torch has on the CPU
    assert {"sdpa", "sdpa flash", "sdpa math", "triton"} <= set(fns)
    assert_all_agree(fns, "sdpa", 1e-4)


def test_attention_rows_compare_with_sdpa_and_its_flash_backend():
    timed = {"sdpa": (2.0, 2.2), "sdpa flash": (4.0, 4.1), "triton": (1.0, 1.5)}
    rows = {r["impl"]: r for r in bench_attention.timed_rows({"case": "c"}, timed, flops=4e9, chosen="cudnn")}
    assert set(rows) == {"sdpa (cudnn)", "sdpa flash", "triton"}
    assert rows["triton"]["speedup"] == 2.0 and rows["triton"]["vs_flash"] == 4.0
    assert rows["triton"]["tflops"] == 4.0 and rows["sdpa flash"]["vs_flash"] == 1.0
    no_flash = bench_attention.timed_rows({}, {"sdpa": (2.0, 2.0), "triton": (1.0, 1.0)}, 1, "math")
    assert [r["vs_flash"] for r in no_flash] == [None, None]


def test_adaln_candidates():
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    shift, scale, gate = (torch.randn(2, 16) for _ in range(3))
    ops, nbytes = bench_adaln.candidates(x, y, shift, scale, gate)
    assert set(ops) == set(nbytes) == {"adaln_modulate", "gated_residual", "gated_residual_modulate", "mlp_fc1_gelu",
                                       "adaln_projections"}
    for op in ("adaln_modulate", "gated_residual"):  # mlp_fc1_gelu's cuBLASLt GELU is tanh on CUDA only
        assert_all_agree(ops[op], "torch", 1e-4)
    for part in range(2):  # (x', norm of x') from each
        assert_all_agree({k: (lambda f=f: f()[part]) for k, f in ops["gated_residual_modulate"].items()}, "torch", 1e-4)
    per_layer, fused = ops["adaln_projections"]["torch"](), ops["adaln_projections"]["fused"]()
    assert len(per_layer) == len(fused) == bench_adaln.DIT_DEPTH + 1
    assert [tuple(t.shape) for t in fused] == [(2, 6 * 16)] * bench_adaln.DIT_DEPTH + [(2, 2 * 16)]
    for a, b in zip(per_layer, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde", [False, True])
def test_sampler_update_candidates(sde):
    x, m0, m1, noise = (torch.randn(1, 4, 6, 6) for _ in range(4))
    fns = bench_sampler_update.candidates(x, m0, m1, noise, sde)
    assert {"torch (chain)", "torch", "triton"} <= set(fns)
    assert_all_agree(fns, "torch (chain)", 1e-5)


def test_geglu_candidates():
    assert_all_agree(bench_geglu.candidates(torch.randn(2, 5, 2 * 12)), "torch", 1e-5)
