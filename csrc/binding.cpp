// torch bindings of the fastdiff CUDA kernels (fastdiff_kernels.cu). Built only on request, through
// `python -m fastdiff.cuda_ext build` (or FASTDIFF_BUILD_CUDA_EXT=1), and imported only by fastdiff/cuda_ext.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fastdiff_kernels.h"

namespace {

fastdiff::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return fastdiff::DType::kFloat32;
    case torch::kFloat16: return fastdiff::DType::kFloat16;
    case torch::kBFloat16: return fastdiff::DType::kBFloat16;
    default: TORCH_CHECK(false, "fastdiff cuda_ext: expected float32 / float16 / bfloat16, found ", t.scalar_type());
  }
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastdiff cuda_ext ", op, ": ", cudaGetErrorString(err));
}

// x (B, C, H, W) in channels-last memory -> GroupNorm(+SiLU), channels-last, x's dtype.
torch::Tensor group_norm_nhwc(torch::Tensor x, int64_t num_groups, c10::optional<torch::Tensor> weight,
                              c10::optional<torch::Tensor> bias, double eps, bool silu) {
  TORCH_CHECK(x.is_cuda(), "group_norm_nhwc: expected a CUDA tensor, found ", x.device());
  TORCH_CHECK(x.dim() == 4, "group_norm_nhwc: expected x of shape (B, C, H, W), found ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "group_norm_nhwc: expected channels divisible by groups, found ",
              C, " channels and ", num_groups, " groups");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  auto y = torch::empty_like(xc, xc.options(), at::MemoryFormat::ChannelsLast);
  torch::Tensor w, b;
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->numel() == C, "group_norm_nhwc: expected weight of ", C, " elements, found ", weight->numel());
    w = weight->to(x.device(), torch::kFloat32).contiguous();
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == C, "group_norm_nhwc: expected bias of ", C, " elements, found ", bias->numel());
    b = bias->to(x.device(), torch::kFloat32).contiguous();
  }
  auto ws = torch::empty({fastdiff::group_norm_nhwc_workspace_floats(B, HW, C, num_groups)},
                         x.options().dtype(torch::kFloat32));
  check_cuda(fastdiff::group_norm_nhwc(xc.data_ptr(), y.data_ptr(), w.defined() ? w.data_ptr<float>() : nullptr,
                                       b.defined() ? b.data_ptr<float>() : nullptr, ws.data_ptr<float>(), (int)B,
                                       (int)HW, (int)C, (int)num_groups, (float)eps, silu, dtype_of(xc),
                                       c10::cuda::getCurrentCUDAStream()),
             "group_norm_nhwc");
  return y;
}

// out = a * x + b * x0 (+ c * prev) (+ d * noise), all of x's shape and dtype; out may be x.
torch::Tensor sampler_update(torch::Tensor x, torch::Tensor x0, c10::optional<torch::Tensor> prev,
                             c10::optional<torch::Tensor> noise, double a, double b, double c, double d,
                             c10::optional<torch::Tensor> out) {
  TORCH_CHECK(x.is_cuda(), "sampler_update: expected a CUDA tensor, found ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  auto same = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
                "sampler_update: expected ", name, " of shape ", x.sizes(), " and dtype ", x.scalar_type(),
                ", found ", t.sizes(), " ", t.scalar_type());
    return t.contiguous();
  };
  auto xc = same(x, "x");
  auto x0c = same(x0, "x0");
  torch::Tensor pc, nc;
  if (prev.has_value() && prev->defined()) pc = same(*prev, "prev");
  if (noise.has_value() && noise->defined()) nc = same(*noise, "noise");
  torch::Tensor o;
  if (out.has_value() && out->defined()) {
    TORCH_CHECK(out->is_contiguous(), "sampler_update: expected a contiguous out");
    o = same(*out, "out");
  } else {
    o = torch::empty_like(xc);
  }
  check_cuda(fastdiff::sampler_update(o.data_ptr(), xc.data_ptr(), x0c.data_ptr(),
                                      pc.defined() ? pc.data_ptr() : nullptr, nc.defined() ? nc.data_ptr() : nullptr,
                                      (float)a, (float)b, (float)c, (float)d, xc.numel(), dtype_of(xc),
                                      c10::cuda::getCurrentCUDAStream()),
             "sampler_update");
  return o;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff CUDA kernels (optional extension)";
  m.def("group_norm_nhwc", &group_norm_nhwc, "GroupNorm(+SiLU) of a channels-last (B, C, H, W) tensor",
        py::arg("x"), py::arg("num_groups"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
        py::arg("eps") = 1e-5, py::arg("silu") = false);
  m.def("sampler_update", &sampler_update, "out = a*x + b*x0 (+ c*prev) (+ d*noise) in one kernel", py::arg("x"),
        py::arg("x0"), py::arg("prev") = py::none(), py::arg("noise") = py::none(), py::arg("a") = 1.0,
        py::arg("b") = 0.0, py::arg("c") = 0.0, py::arg("d") = 0.0, py::arg("out") = py::none());
}
