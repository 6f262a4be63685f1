// Decode attention over the static KV cache, torch's side: checks, the
// partial buffers and the launches (the kernels: attention_kernels.cuh).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>

#include "attention_kernels.cuh"

namespace {

template <int G>
void launch(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const torch::Tensor& pos,
            torch::Tensor& part_o, torch::Tensor& part_ml, torch::Tensor& out, int ctx, int per, int splits,
            float scale) {
  const int rows = static_cast<int>(q.size(0)), n_kv = static_cast<int>(kc.size(1));
  const int max_len = static_cast<int>(kc.size(2));
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool dependent = dependent_launch_on();
  C10_CUDA_CHECK(launch_dependent(
      dependent, attn_split_kernel<G>, dim3(splits, n_kv, rows), dim3(split_warps<G>() * 32), 0, stream,
      reinterpret_cast<const half*>(q.data_ptr<at::Half>()), reinterpret_cast<const half*>(kc.data_ptr<at::Half>()),
      reinterpret_cast<const half*>(vc.data_ptr<at::Half>()), pos.data_ptr<int64_t>(), part_o.data_ptr<float>(),
      reinterpret_cast<float2*>(part_ml.data_ptr<float>()), n_kv, max_len, ctx, per, splits, scale));
  C10_CUDA_CHECK(launch_dependent(
      dependent, attn_merge_kernel<G>, dim3(n_kv * G, rows), dim3(kDim), 0, stream, part_o.data_ptr<float>(),
      reinterpret_cast<const float2*>(part_ml.data_ptr<float>()), pos.data_ptr<int64_t>(),
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), n_kv, ctx, per, splits));
}

}  // namespace

// q [rows, heads, 128] half; k_cache, v_cache [>= rows, kv heads, max_len, 128]
// half (one layer's caches); pos [rows] int64; keys 0..pos[r] of row r are
// read, at most the first ctx <= max_len (a padded row's pos is past them);
// `per` keys a block (a multiple of 32; 0: attn_plan's choice). Returns
// [rows, heads * 128] half.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor pos,
                               int64_t ctx, double scale, int64_t per) {
  TORCH_CHECK(q.is_cuda() && q.scalar_type() == torch::kHalf && q.dim() == 3 && q.is_contiguous() &&
                  q.size(2) == kDim,
              "q: a contiguous half CUDA tensor [rows, heads, 128]");
  for (const auto* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->scalar_type() == torch::kHalf && c->dim() == 4 && c->is_contiguous() && c->size(3) == kDim &&
                    c->size(0) >= q.size(0) && c->sizes() == k_cache.sizes(),
                "caches: contiguous half tensors [rows, kv heads, max_len, 128], both the same shape");
  TORCH_CHECK(pos.scalar_type() == torch::kInt64 && pos.dim() == 1 && pos.size(0) == q.size(0) &&
                  pos.is_contiguous(),
              "pos: int64 [rows]");
  TORCH_CHECK(per >= 0 && per % kKeys == 0, "per: 0 or a multiple of 32");
  TORCH_CHECK(ctx > 0 && ctx <= k_cache.size(2), "ctx: 1..max_len keys");
  const int64_t n_kv = k_cache.size(1);
  TORCH_CHECK(q.size(1) % n_kv == 0, "heads must be a multiple of kv heads");
  const int64_t g = q.size(1) / n_kv;
  const c10::cuda::CUDAGuard guard(q.device());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const AttnPlan plan = attn_plan(static_cast<int>(q.size(0)), static_cast<int>(n_kv), static_cast<int>(ctx), sms,
                                  static_cast<int>(per));
  const int64_t splits = plan.splits;
  auto part_o = torch::empty({q.size(0), n_kv, splits, g, kDim}, q.options().dtype(torch::kFloat32));
  auto part_ml = torch::empty({q.size(0), n_kv, splits, g, 2}, q.options().dtype(torch::kFloat32));
  auto out = torch::empty({q.size(0), q.size(1) * kDim}, q.options());
  const int c = static_cast<int>(ctx), p = plan.per, s = plan.splits;
  const float sc = static_cast<float>(scale);
  switch (g) {
    case 1: launch<1>(q, k_cache, v_cache, pos, part_o, part_ml, out, c, p, s, sc); break;
    case 2: launch<2>(q, k_cache, v_cache, pos, part_o, part_ml, out, c, p, s, sc); break;
    case 4: launch<4>(q, k_cache, v_cache, pos, part_o, part_ml, out, c, p, s, sc); break;
    case 8: launch<8>(q, k_cache, v_cache, pos, part_o, part_ml, out, c, p, s, sc); break;
    default: TORCH_CHECK(false, "query heads per kv head: 1, 2, 4 or 8");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_dependent_launch", [](bool on) { dependent_launch_on() = on; },
        "the kernels' launches as programmatic dependent launches (Hopper and later)");
  m.def("decode_attention", &decode_attention, "one token per row against its cached keys 0..pos");
}
