"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, at the configurations the models use.

No GPU needed: ``triton.compile`` with a ``GPUTarget`` runs the whole NVIDIA pipeline down to PTX and
cubin. The Triton interpreter (TRITON_INTERPRET=1, set by conftest) cannot compile in-process, so the
compiles run in one subprocess per architecture, both at once, with the variable removed. This is where
the bfloat16 ``tl.dot`` of the attention kernel is checked (the interpreter cannot run it, see
test_attention.py).

By default the quick set is compiled: the QUICK subset of the listed shapes (every kernel x dtype x arch,
every group-norm mode, attention at D = 40 and 80 with 77 keys and at 72, in half precision with every
autotuner tile) and every distinct launch the shipped models make in float16 (``aot_models``: recorded from
forward passes on the meta device; test_aot_models.py), about 850 compiles per arch: 5.5 minutes for both
archs on this project's 2-core machine with a cold Triton cache, under 2 with a warm one.
FASTDIFF_AOT_FULL=1 (or ``python -m fastdiff.kernels.aot``) compiles everything: every listed shape, the models'
launches in every dtype and their autotuner tiles, about 1900 compiles per arch.
"""

import os


import pytest
import torch

from fastdiff.kernels import aot

triton = pytest.importorskip("triton")


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except Exception:  # pragma: no cover - triton layout without the registry
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="this triton build has no NVIDIA backend")

KERNELS = ("group_norm", "attention", "adaln_modulate", "gated_residual", "gated_residual_modulate",
           "residual_layer_norm", "lincomb", "geglu", "attention_tma")
DTYPES = ("fp16", "bf16", "fp32")


FULL = os.environ.get("FASTDIFF_AOT_FULL") == "1"


@pytest.fixture(scope="module")
def results():
    procs = {arch: aot.start_subprocess(arch, quick=not FULL) for arch in aot.ARCHS}
    return {arch: aot.collect(p, timeout=1800) for arch, p in procs.items()}


# the TMA attention is compiled for sm_90 only: the launcher never picks it on older GPUs
CASES = [pytest.param(arch, kernel, id=f"sm_{arch}-{kernel}") for arch in aot.ARCHS for kernel in KERNELS
         if kernel != "attention_tma" or arch >= 90]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch,kernel", CASES)
def test_kernel_compiles_for_every_model_config(results, arch, kernel, dtype):
    if kernel == "attention_tma":
        import importlib

        if importlib.import_module("fastdiff.kernels.attention_tma")._descriptor_class() is None:
            pytest.skip("this triton has no host tensor descriptors (needs >= 3.4)")
        if dtype == "fp32":  # a GPU runs fp32 attention on the pointer kernel: no TMA configuration to compile
            assert not [r for r in results[arch] if r.kernel == kernel and r.dtype == dtype]
            return
    all_rows = [r for r in results[arch] if r.kernel == kernel and r.dtype == dtype]
    rows = [r for r in all_rows if not r.extra.get("tuned")]
    assert rows, f"no {kernel} {dtype} configuration was compiled for sm_{arch}"
    failed = [f"{r.label}: {r.error}" for r in rows if not r.ok]
    assert not failed, "\n".join(failed)
    for r in rows:
        assert r.ptx_bytes > 0 and r.cubin_bytes > 0
        assert r.shared_bytes <= aot.MAX_SHARED[arch]
    # the autotuner's candidate tiles: each compiles; one that needs more shared memory than the GPU has
    # is pruned by the autotuner at run time, but every problem keeps at least one tile that fits
    tuned = [r for r in all_rows if r.extra.get("tuned")]
    broken = [f"{r.label}: {r.error}" for r in tuned if not r.ok and "shared memory" not in r.error]
    assert not broken, "\n".join(broken)
    for base in {r.label.rsplit(" tile", 1)[0] for r in tuned}:
        assert any(r.ok for r in tuned if r.label.startswith(base + " tile")), f"{base}: no tuned tile fits"
    if kernel == "attention" and dtype != "fp32":
        assert tuned, "half-precision attention runs autotuned on a GPU: its tiles must be compiled too"
        # every tile's loads and stores vectorise: with a runtime head dim, D = 40 / 72 compiled to 2-byte loads
        narrow = [f"{r.label}: {r.extra['narrow_half_accesses']}" for r in all_rows if r.ok and
                  "unaligned" not in r.label and r.extra.get("narrow_half_accesses")]
        assert not narrow, "\n".join(narrow)
        # ... and the unaligned variant (no alignment hint) is compiled too, with 2-byte accesses
        unaligned = [r for r in all_rows if "unaligned" in r.label]
        assert unaligned and all(r.extra.get("narrow_half_accesses") for r in unaligned if r.ok)
    if kernel == "attention_tma" and arch >= 90:
        # sm_90: the descriptor loads / stores are TMA bulk copies, the dots wgmma (sm_80 compiles them to pointer
        # loads: the launcher never picks this kernel there)
        plain = [r.label for r in all_rows if r.ok and not r.extra.get("tma_copies")]
        assert not plain, plain
        if dtype != "fp32":  # (a tile under 64 rows, a tiny model's, runs mma.sync)
            assert all(r.extra.get("wgmma") for r in all_rows if r.ok and r.extra.get("block_m", 64) >= 64)
    if kernel == "group_norm" and dtype != "fp32":
        # channels-last groups of SD's 10 / 40 channels: 4- / 16-byte accesses (a runtime channels-per-group
        # compiled to 2-byte ones); the one-channel groups of 2x32x1x1 cannot vectorise
        narrow = [f"{r.label}: {r.extra['narrow_half_accesses']}" for r in all_rows if r.ok and "nhwc" in r.label
                  and " rows " not in r.label and not r.label.startswith("2x32x1x1")
                  and r.extra.get("narrow_half_accesses")]
        assert not narrow, "\n".join(narrow)


def test_configs_cover_the_model_shapes():
    labels = {(c.kernel, c.label) for c in aot.configs(dtypes=(torch.float16,))}
    for d in (40, 64, 72, 80, 128, 160):
        assert any(k == "attention" and f"D{d}" in lbl for k, lbl in labels), d
    assert any("Nk77 D40" in lbl for _, lbl in labels)  # cross attention: Nk not a block multiple
    assert any(k == "attention" and "H16 Nq256 Nk256 D72" in lbl for k, lbl in labels)  # DiT-XL/2
    parts = {lbl.split()[-1] for k, lbl in labels if k == "group_norm" and not lbl.startswith("model ")}
    # "groups": fused (8x8) and split statistics (64x64); "rows": its three launches
    assert parts == {"mode0", "mode1", "mode2", "stats_kernel", "coef_kernel", "apply_kernel"}
    assert any(k == "adaln_modulate" and "D1152" in lbl for k, lbl in labels)
    assert {lbl for k, lbl in labels if k == "lincomb" and lbl.startswith("1x4x64x64")} == {
        f"1x4x64x64 terms{n}" for n in (2, 3, 4, 5)}


def test_source_specialises_like_the_jit():
    """ints equal to 1 become constexprs, multiples of 16 get divisibility hints, pointers typed by dtype."""
    cfg = next(c for c in aot.configs(["group_norm"], (torch.bfloat16,)) if "nhwc" in c.label)
    src, options = aot._source(cfg)
    assert src.signature["x_ptr"] == "*bf16" and src.signature["ws_ptr"] == "*fp32"
    assert src.signature["stride_xc"] == "constexpr"  # channels-last: unit channel stride
    assert src.signature["eps"] == "fp32" and src.signature["C"] == "i32"
    assert options == {"num_warps": cfg.meta["num_warps"]}


def test_compile_all_under_the_interpreter_uses_a_subprocess():
    res = aot.compile_all(90, kernels=["adaln"], dtypes=(torch.float16,))
    assert [r.kernel for r in res] == ["adaln_modulate", "gated_residual", "gated_residual_modulate",
                                       "residual_layer_norm", "residual_layer_norm"]
    assert all(r.ok for r in res)
    assert "gated_residual" in aot.format_table(res)
