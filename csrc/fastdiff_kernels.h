// fastdiff CUDA kernels: a plain C++ interface over raw device pointers.
//
// This header and fastdiff_kernels.cu need only the CUDA toolkit (no torch headers), so `nvcc -c` can
// check them anywhere; binding.cpp wraps them as torch ops.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastdiff {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Floats of workspace group_norm_nhwc needs for these sizes (partial statistics per group slice).
int64_t group_norm_nhwc_workspace_floats(int B, int HW, int C, int G);

// GroupNorm (+ SiLU) of x, channels-last: x[b, s, c] at ((b * HW + s) * C + c), s over H*W.
// Statistics per (sample, group) in float32 (Welford per thread, merged with Chan's formula);
// weight / bias: float32 [C] or nullptr. y may not alias x. workspace: group_norm_nhwc_workspace_floats.
cudaError_t group_norm_nhwc(const void* x, void* y, const float* weight, const float* bias, float* workspace,
                            int B, int HW, int C, int G, float eps, bool silu, DType dtype, cudaStream_t stream);

// One fused sampler step: out = a * x + b * x0 + c * prev + d * noise over n elements, in float32.
// prev / noise may be nullptr (their term is dropped); out may alias x.
cudaError_t sampler_update(void* out, const void* x, const void* x0, const void* prev, const void* noise, float a,
                           float b, float c, float d, int64_t n, DType dtype, cudaStream_t stream);

}  // namespace fastdiff
