// The decode step's residual add and RMSNorm in one kernel (bot/engine/norm.py):
//   s = x + y (half, as torch adds halves), r = rsqrt(mean(float(s)^2) + eps),
//   out = w * half(float(s) * r)  (half, as torch multiplies halves).
// One block a row, each thread eight halves at a time: the first pass adds,
// writes s and sums the squares, the block reduces, the second pass rereads
// its own s and normalizes.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>

#include "dependent_launch.cuh"

namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__global__ void __launch_bounds__(kThreads) add_rms_norm_kernel(
    const int4* __restrict__ x, const int4* __restrict__ y, const int4* __restrict__ w, int4* __restrict__ sum,
    int4* __restrict__ normed, int vecs, float inv_hidden, float eps) {
  const size_t base = static_cast<size_t>(blockIdx.x) * vecs;
  wait_for_prior_kernels();  // x and y are earlier kernels' outputs (a dependent launch: dependent_launch.cuh)
  dependents_may_launch();
  float sq = 0.f;
  for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
    int4 a = x[base + i];
    const int4 b = y[base + i];
    half2* ah = reinterpret_cast<half2*>(&a);
    const half2* bh = reinterpret_cast<const half2*>(&b);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      ah[j] = __hadd2(ah[j], bh[j]);
      const float2 f = __half22float2(ah[j]);
      sq += f.x * f.x + f.y * f.y;
    }
    sum[base + i] = a;
  }
  __shared__ float part[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  sq = warp_sum(sq);
  if (lane == 0) part[warp] = sq;
  __syncthreads();
  if (warp == 0) {
    float v = lane < static_cast<int>(blockDim.x >> 5) ? part[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) part[0] = v;
  }
  __syncthreads();
  const float r = rsqrtf(part[0] * inv_hidden + eps);
  for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
    int4 s = sum[base + i];  // this thread's own write above
    const int4 g = __ldg(w + i);
    half2* sh = reinterpret_cast<half2*>(&s);
    const half2* gh = reinterpret_cast<const half2*>(&g);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(sh[j]);
      const half2 h = __floats2half2_rn(f.x * r, f.y * r);
      const float2 hf = __half22float2(h), gf = __half22float2(gh[j]);
      sh[j] = __floats2half2_rn(gf.x * hf.x, gf.y * hf.y);
    }
    normed[base + i] = s;
  }
}

}  // namespace

// x, y [rows, hidden] half, contiguous, hidden a multiple of 8; w [hidden]
// half. Returns (x + y, w * rmsnorm(x + y)), both [rows, hidden] half.
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor y, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kHalf && x.dim() == 2 && x.is_contiguous(),
              "x: a contiguous half CUDA tensor [rows, hidden]");
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == torch::kHalf && y.is_contiguous() &&
                  y.device() == x.device(),
              "y: x's shape, half, contiguous, on x's device");
  const int64_t hidden = x.size(1);
  TORCH_CHECK(hidden % 8 == 0 && hidden > 0, "hidden: a multiple of 8");
  for (const auto* t : {&x, &y, &w})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "x, y and w: 16-byte aligned");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == hidden && w.scalar_type() == torch::kHalf && w.is_contiguous() &&
                  w.device() == x.device(),
              "w: half [hidden], contiguous, on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  auto sum = torch::empty_like(x);
  auto normed = torch::empty_like(x);
  const int vecs = static_cast<int>(hidden / 8);
  const int threads = std::min(kThreads, ((vecs + 31) / 32) * 32);
  if (x.size(0) > 0) {
    C10_CUDA_CHECK(launch_dependent(
        dependent_launch_on(), add_rms_norm_kernel, dim3(static_cast<unsigned>(x.size(0))), dim3(threads), 0,
        at::cuda::getCurrentCUDAStream(), reinterpret_cast<const int4*>(x.data_ptr<at::Half>()),
        reinterpret_cast<const int4*>(y.data_ptr<at::Half>()), reinterpret_cast<const int4*>(w.data_ptr<at::Half>()),
        reinterpret_cast<int4*>(sum.data_ptr<at::Half>()), reinterpret_cast<int4*>(normed.data_ptr<at::Half>()), vecs,
        1.f / static_cast<float>(hidden), static_cast<float>(eps)));
  }
  return {sum, normed};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_dependent_launch", [](bool on) { dependent_launch_on() = on; },
        "the kernel's launches as programmatic dependent launches (Hopper and later)");
  m.def("add_rms_norm", &add_rms_norm, "(x + y, w * rmsnorm(x + y)) for rows of half");
}
