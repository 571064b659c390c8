// fastdiff CUDA kernels (see fastdiff_kernels.h). CUDA toolkit headers only: no torch.
#include "fastdiff_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastdiff {
namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float load_f(const T* p, int64_t i);
template <> __device__ __forceinline__ float load_f<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float load_f<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float load_f<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

template <typename T> __device__ __forceinline__ void store_f(T* p, int64_t i, float v);
template <> __device__ __forceinline__ void store_f<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> __device__ __forceinline__ void store_f<__half>(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
template <> __device__ __forceinline__ void store_f<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

// Running (mean, M2, count); merge() is Chan et al.'s pairwise update, stable for |mean| >> std.
struct Welford {
  float mean, m2, n;
};

__device__ __forceinline__ Welford merge(Welford a, Welford b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float wb = b.n / n;
  return {a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb, n};
}

__device__ __forceinline__ Welford warp_merge(Welford w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Welford o{__shfl_down_sync(0xffffffffu, w.mean, offset), __shfl_down_sync(0xffffffffu, w.m2, offset),
              __shfl_down_sync(0xffffffffu, w.n, offset)};
    w = merge(w, o);
  }
  return w;
}

int gn_splits(int B, int HW, int G) {
  // ~1024 blocks in all for the statistics pass, each slice at least 64 spatial positions
  int want = (1024 + B * G - 1) / (B * G);
  int most = (HW + 63) / 64;
  int s = want < most ? want : most;
  return s < 1 ? 1 : s;
}

// grid (B * G, splits): partial (mean, M2, n) of one spatial slice of one (sample, group).
template <typename T>
__global__ void __launch_bounds__(kThreads) gn_stats_kernel(const T* __restrict__ x, float* __restrict__ ws, int HW,
                                                             int C, int G, int splits) {
  const int bg = blockIdx.x, sp = blockIdx.y;
  const int b = bg / G, g = bg % G, cpg = C / G;
  const int chunk = (HW + splits - 1) / splits;
  const int s0 = sp * chunk;
  const int s1 = min(s0 + chunk, HW);
  const int64_t count = s1 > s0 ? (int64_t)(s1 - s0) * cpg : 0;
  Welford w{0.f, 0.f, 0.f};
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const int s = s0 + (int)(i / cpg), c = g * cpg + (int)(i % cpg);
    const float v = load_f(x, ((int64_t)b * HW + s) * C + c);
    w.n += 1.f;
    const float d = v - w.mean;
    w.mean += d / w.n;
    w.m2 += d * (v - w.mean);
  }
  w = warp_merge(w);
  __shared__ Welford part[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) part[warp] = w;
  __syncthreads();
  if (threadIdx.x == 0) {
    Welford t = part[0];
    for (int k = 1; k < (int)(blockDim.x / 32); ++k) t = merge(t, part[k]);
    float* out = ws + ((int64_t)bg * splits + sp) * 3;
    out[0] = t.mean;
    out[1] = t.m2;
    out[2] = t.n;
  }
}

// grid (B, chunks): merge the partials of every group of sample b into shared (mean, rstd), then
// normalise (+ affine, + SiLU) one contiguous chunk of that sample's HW * C elements.
template <typename T>
__global__ void __launch_bounds__(kThreads) gn_apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                             const float* __restrict__ weight,
                                                             const float* __restrict__ bias,
                                                             const float* __restrict__ ws, int HW, int C, int G,
                                                             int splits, int64_t chunk, float eps, bool silu) {
  extern __shared__ float stats[];  // [2 * G]: mean, rstd
  const int b = blockIdx.x, cpg = C / G;
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    Welford t{0.f, 0.f, 0.f};
    const float* p = ws + ((int64_t)(b * G + g) * splits) * 3;
    for (int k = 0; k < splits; ++k) t = merge(t, Welford{p[3 * k], p[3 * k + 1], p[3 * k + 2]});
    stats[2 * g] = t.mean;
    stats[2 * g + 1] = rsqrtf(t.m2 / t.n + eps);
  }
  __syncthreads();
  const int64_t total = (int64_t)HW * C;
  const int64_t e0 = (int64_t)blockIdx.y * chunk;
  const int64_t e1 = min(e0 + chunk, total);
  const int64_t base = (int64_t)b * total;
  for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
    const int c = (int)(e % C), g = c / cpg;
    float v = (load_f(x, base + e) - stats[2 * g]) * stats[2 * g + 1];
    if (weight != nullptr) v *= weight[c];
    if (bias != nullptr) v += bias[c];
    if (silu) v = v / (1.f + __expf(-v));
    store_f(y, base + e, v);
  }
}

template <typename T>
cudaError_t group_norm_nhwc_t(const T* x, T* y, const float* weight, const float* bias, float* ws, int B, int HW,
                              int C, int G, float eps, bool silu, cudaStream_t stream) {
  if (B <= 0 || HW <= 0 || C <= 0 || G <= 0 || C % G != 0) return cudaErrorInvalidValue;
  const int splits = gn_splits(B, HW, G);
  gn_stats_kernel<T><<<dim3(B * G, splits), kThreads, 0, stream>>>(x, ws, HW, C, G, splits);
  const int64_t total = (int64_t)HW * C;
  const int64_t chunk = 8 * kThreads * 4;  // elements per apply block
  const int64_t chunks = (total + chunk - 1) / chunk;
  gn_apply_kernel<T><<<dim3(B, (unsigned)chunks), kThreads, 2 * G * sizeof(float), stream>>>(
      x, y, weight, bias, ws, HW, C, G, splits, chunk, eps, silu);
  return cudaGetLastError();
}

template <typename T>
// x is not __restrict__: out may alias it (an in-place update). Each element is read before it is written, by
// the same thread, so aliasing is safe; __restrict__ would let the compiler assume otherwise (ld.global.nc).
__global__ void sampler_update_kernel(T* out, const T* x, const T* __restrict__ x0,
                                      const T* __restrict__ prev, const T* __restrict__ noise, float a, float b,
                                      float c, float d, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float v = a * load_f(x, i) + b * load_f(x0, i);
    if (prev != nullptr) v += c * load_f(prev, i);
    if (noise != nullptr) v += d * load_f(noise, i);
    store_f(out, i, v);
  }
}

template <typename T>
cudaError_t sampler_update_t(T* out, const T* x, const T* x0, const T* prev, const T* noise, float a, float b, float c,
                             float d, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride beyond that
  sampler_update_kernel<T><<<(unsigned)blocks, kThreads, 0, stream>>>(out, x, x0, prev, noise, a, b, c, d, n);
  return cudaGetLastError();
}

}  // namespace

int64_t group_norm_nhwc_workspace_floats(int B, int HW, int C, int G) {
  (void)C;
  return (int64_t)B * G * gn_splits(B, HW, G) * 3;
}

cudaError_t group_norm_nhwc(const void* x, void* y, const float* weight, const float* bias, float* workspace, int B,
                            int HW, int C, int G, float eps, bool silu, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return group_norm_nhwc_t(static_cast<const float*>(x), static_cast<float*>(y), weight, bias, workspace, B, HW,
                               C, G, eps, silu, stream);
    case DType::kFloat16:
      return group_norm_nhwc_t(static_cast<const __half*>(x), static_cast<__half*>(y), weight, bias, workspace, B,
                               HW, C, G, eps, silu, stream);
    case DType::kBFloat16:
      return group_norm_nhwc_t(static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(y), weight, bias,
                               workspace, B, HW, C, G, eps, silu, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t sampler_update(void* out, const void* x, const void* x0, const void* prev, const void* noise, float a,
                           float b, float c, float d, int64_t n, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return sampler_update_t(static_cast<float*>(out), static_cast<const float*>(x), static_cast<const float*>(x0),
                              static_cast<const float*>(prev), static_cast<const float*>(noise), a, b, c, d, n,
                              stream);
    case DType::kFloat16:
      return sampler_update_t(static_cast<__half*>(out), static_cast<const __half*>(x), static_cast<const __half*>(x0),
                              static_cast<const __half*>(prev), static_cast<const __half*>(noise), a, b, c, d, n,
                              stream);
    case DType::kBFloat16:
      return sampler_update_t(static_cast<__nv_bfloat16*>(out), static_cast<const __nv_bfloat16*>(x),
                              static_cast<const __nv_bfloat16*>(x0), static_cast<const __nv_bfloat16*>(prev),
                              static_cast<const __nv_bfloat16*>(noise), a, b, c, d, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdiff
