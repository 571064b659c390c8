"""DiT block ops: fastdiff's Triton ``adaln_modulate`` / ``gated_residual`` vs the torch expressions, a residual
and the norm after it in one pass (``gated_residual_modulate``) vs the two kernels ("triton pair") and torch, the
MLP's fc1 + GELU(tanh) as one cuBLASLt GEMM (``torch._addmm_activation``) vs GEMM + GELU, and the 29 adaLN
projections of a DiT-XL/2 call as one GEMM (``fuse_adaln``) vs one GEMM each.

Shape: DiT-XL/2 at 256x256 (T=256 tokens, D=1152), batch 2 and 16 (8 images with CFG); float16 and
bfloat16. Reported: median and p90 latency (CUDA events after warm-up), effective bandwidth (adaln:
read x, write y; gated residual: read x and y, write out) and the speed-up over torch's
``F.layer_norm(x) * (1 + scale[:, None]) + shift[:, None]`` and ``x + gate[:, None] * y``.

    python bench/bench_adaln.py [--dtype float16 bfloat16]  (default float16) [--iters 100]
    pytest bench/bench_adaln.py   # pytest-benchmark functions (GPU only)
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from kernel_timing import benchmark_synchronized, kernel_bench_main, time_cuda

SHAPES = [(2, 256, 1152), (16, 256, 1152)]  # (B, T, D)
DIT_DEPTH = 28  # DiT-XL/2's blocks: one adaLN projection each, plus the final layer's


def candidates(x, y, shift, scale, gate):
    """op -> {impl -> zero-argument callable}, and the bytes each op moves."""
    from fastdiff.kernels import adaln_modulate, gated_residual, gated_residual_modulate

    D = x.shape[-1]
    ops = {
        "adaln_modulate": {
            "torch": lambda: F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None],
            "triton": lambda: adaln_modulate(x, shift, scale, eps=1e-6),
        },
        "gated_residual": {
            "torch": lambda: x + gate[:, None] * y,
            "triton": lambda: gated_residual(x, gate, y),
        },
    }

    def resnorm_torch():
        r = x + gate[:, None] * y
        return r, F.layer_norm(r, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def resnorm_pair():  # what runs 1-3 measured end to end: the residual kernel, then the norm's
        r = gated_residual(x, gate, y)
        return r, adaln_modulate(r, shift, scale, eps=1e-6)

    # a DiT residual and the adaLN norm after it (ModulatedLayerNorm with residual=): each returns (x', norm)
    ops["gated_residual_modulate"] = {
        "torch": resnorm_torch,
        "triton pair": resnorm_pair,
        "triton": lambda: gated_residual_modulate(x, gate, y, shift, scale, eps=1e-6),
    }
    # the MLP's fc1 + GELU(tanh): two kernels, or one cuBLASLt GEMM with a bias + GELU epilogue (fastdiff's
    # DiT MLP on CUDA). GB/s counts x, the weights and the (B*T, 4D) output once.
    w1 = torch.randn(4 * D, D, device=x.device, dtype=x.dtype) * D ** -0.5
    b1 = torch.randn(4 * D, device=x.device, dtype=x.dtype)
    x2 = x.reshape(-1, D)
    ops["mlp_fc1_gelu"] = {
        "torch": lambda: F.gelu(F.linear(x2, w1, b1), approximate="tanh"),
        "cublaslt": lambda: torch._addmm_activation(b1, x2, w1.t(), use_gelu=True),
    }
    # every block's adaLN projection (depth x (D -> 6D)) and the final layer's (D -> 2D) from SiLU(c) (B, D):
    # one small GEMM per layer, or one GEMM over the stacked weights (OptimizeConfig(fuse_adaln=True)). Both
    # return the per-layer outputs; GB/s counts the weights once (the GEMMs stream them: M = B rows).
    sizes = [6 * D] * DIT_DEPTH + [2 * D]
    w_all = torch.randn(sum(sizes), D, device=x.device, dtype=x.dtype) * D ** -0.5
    b_all = torch.randn(sum(sizes), device=x.device, dtype=x.dtype)
    w_layers, b_layers = w_all.split(sizes), b_all.split(sizes)
    c = F.silu(shift)  # (B, D)
    ops["adaln_projections"] = {
        "torch": lambda: [F.linear(c, w, b) for w, b in zip(w_layers, b_layers)],
        "fused": lambda: F.linear(c, w_all, b_all).split(sizes, dim=1),
    }
    # GB/s counts what one pass must move: x, y read, x' and the norm written
    nbytes = {"adaln_modulate": 2 * x.numel() * x.element_size(), "gated_residual": 3 * x.numel() * x.element_size(),
              "gated_residual_modulate": 4 * x.numel() * x.element_size(),
              "mlp_fc1_gelu": (5 * x.numel() + w1.numel()) * x.element_size(),
              "adaln_projections": (w_all.numel() + c.numel() + c.shape[0] * sum(sizes)) * x.element_size()}
    return ops, nbytes


def run(dtypes=(torch.float16, torch.bfloat16), iters: int = 100) -> list[dict]:
    rows = []
    for B, T, D in SHAPES:
        for dtype in dtypes:
            x, y = (torch.randn(B, T, D, device="cuda", dtype=dtype) for _ in range(2))
            shift, scale, gate = (torch.randn(B, D, device="cuda", dtype=dtype) for _ in range(3))
            ops, nbytes = candidates(x, y, shift, scale, gate)
            for op, impls in ops.items():
                base = None
                for impl, fn in impls.items():
                    med, p90 = time_cuda(fn, iters=iters)
                    base = med if impl == "torch" else base
                    rows.append(dict(op=op, shape=f"{B}x{T}x{D}", dtype=str(dtype).split(".")[1], impl=impl,
                                     median_ms=med, p90_ms=p90, gbps=nbytes[op] / (med * 1e-3) / 1e9,
                                     speedup=base / med))
    return rows


def print_rows(rows) -> None:
    print(f"{'op':<25}{'shape':<14}{'dtype':<10}{'impl':<13}{'median us':>10}{'p90 us':>9}{'GB/s':>8}{'vs torch':>9}")
    for r in rows:
        print(f"{r['op']:<25}{r['shape']:<14}{r['dtype']:<10}{r['impl']:<13}{r['median_ms'] * 1e3:>10.1f}"
              f"{r['p90_ms'] * 1e3:>9.1f}{r['gbps']:>8.0f}{r['speedup']:>8.2f}x")


def main(argv=None) -> int:
    return kernel_bench_main("bench_adaln", __doc__.split("\n\n")[0], run, print_rows, argv)


# ----------------------------------------------------------------------------------- pytest-benchmark
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual", "gated_residual_modulate"])
def test_adaln_ops(benchmark, op, impl):
    B, T, D = SHAPES[1]
    x, y = (torch.randn(B, T, D, device="cuda", dtype=torch.float16) for _ in range(2))
    shift, scale, gate = (torch.randn(B, D, device="cuda", dtype=torch.float16) for _ in range(3))
    fn = candidates(x, y, shift, scale, gate)[0][op][impl]

    benchmark_synchronized(benchmark, fn)


if __name__ == "__main__":
    raise SystemExit(main())
