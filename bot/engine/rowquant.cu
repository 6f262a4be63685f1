// Channelwise 4-bit GPTQ weights in a row layout (bot/engine/rowquant.py says
// what the layout is and why). Three kernels:
//
//   rowquant_gemv(x [m, k] half, w, scale, zero) -> [m, n] half, m <= 4:
//     one warp per R output rows, each lane reads 16 bytes (32 weights) of a
//     row at a time, so a warp reads 512 contiguous bytes; the products of
//     (q - z) / 128 and x are summed in half2 over two packed words (8 per
//     half) and in float beyond, each output scaled once; one warp shuffle
//     reduction (gemv_kernel's comment in rowquant_kernels.cuh).
//   rowquant_mma(x [m, k] half, w, scale, zero, splits, tiles) -> [m, n] half,
//     m <= 32: tensor cores on the same packing (mma_kernel's comment in rowquant_kernels.cuh).
//   rowquant_dequant(w, scale, zero, items) -> [n, k] half: nn.Linear's layout, for
//     prompts (cuBLAS does the product).
//
// Nibble order in a word: slot p (bits 4p..4p+3) holds input k0 + ORDER[p],
// ORDER = 0,2,4,6,1,3,5,7, so that one mask pulls slots j and j+4 into the
// two halves of a half2 that lines up with x's half2 at k0 + 2j.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>

#include "rowquant_kernels.cuh"

namespace {

bool gemv_late_trigger = false;  // the row kernel lets the next kernel launch late (set_gemv_late_trigger)

template <int M, int R, int W = gemv_words(M)>
void launch_gemv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                 const torch::Tensor& zero, torch::Tensor& out) {
  const int n = static_cast<int>(w.size(0));
  const int chunks = static_cast<int>(w.size(1) / 4);
  const int blocks = (n + kWarps * R - 1) / (kWarps * R);
  C10_CUDA_CHECK(launch_dependent(
      dependent_launch_on(), gemv_kernel<M, R, kGemvStages, true, W>, dim3(blocks), dim3(kWarps * 32), 0,
      at::cuda::getCurrentCUDAStream(), reinterpret_cast<const int4*>(w.data_ptr<int32_t>()),
      reinterpret_cast<const half*>(scale.data_ptr<at::Half>()),
      reinterpret_cast<const half*>(zero.data_ptr<at::Half>()),
      reinterpret_cast<const int4*>(x.data_ptr<at::Half>()),
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), n, chunks, gemv_late_trigger));
}

// one_row_words: words a half sum at one row, 2 or 4 (rowquant.ONE_ROW_WORDS).
template <int R>
void dispatch_rows(int m, int one_row_words, const torch::Tensor& x, const torch::Tensor& w,
                   const torch::Tensor& scale, const torch::Tensor& zero, torch::Tensor& out) {
  switch (m) {
    case 1:
      if (one_row_words == 4) {
        launch_gemv<1, R, 4>(x, w, scale, zero, out);
      } else {
        launch_gemv<1, R, 2>(x, w, scale, zero, out);
      }
      break;
    case 2: launch_gemv<2, R>(x, w, scale, zero, out); break;
    case 3: launch_gemv<3, R>(x, w, scale, zero, out); break;
    default: launch_gemv<4, R>(x, w, scale, zero, out); break;
  }
}

void check_weights(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& zero) {
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == torch::kInt32 && w.dim() == 2 && w.is_contiguous(),
              "w: a contiguous int32 CUDA matrix [n, k / 8]");
  TORCH_CHECK(w.size(1) % 4 == 0, "k must be a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && scale.is_contiguous() && scale.numel() == w.size(0),
              "scale: n halves");
  TORCH_CHECK(zero.scalar_type() == torch::kHalf && zero.is_contiguous() && zero.numel() == w.size(0),
              "zero: n halves");
}

template <int NT, int TILES>
void launch_mma(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                const torch::Tensor& zero, torch::Tensor& out, int splits) {
  const int n = static_cast<int>(w.size(0)), k = static_cast<int>(w.size(1) * 8), m = static_cast<int>(x.size(0));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const KPlan pl = mma_plan(n, k, NT, sms, splits);
  torch::Tensor part;
  if (pl.splits > 1) part = torch::empty({pl.splits, n, NT * 8}, x.options().dtype(torch::kFloat32));
  C10_CUDA_CHECK((mma_launch<NT, TILES>(
      pl, reinterpret_cast<const int4*>(w.data_ptr<int32_t>()),
      reinterpret_cast<const half*>(scale.data_ptr<at::Half>()),
      reinterpret_cast<const half*>(zero.data_ptr<at::Half>()), reinterpret_cast<const int4*>(x.data_ptr<at::Half>()),
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), pl.splits > 1 ? part.data_ptr<float>() : nullptr, n, k, m,
      at::cuda::getCurrentCUDAStream())));
}

}  // namespace

torch::Tensor rowquant_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor zero,
                            int64_t rows_per_warp, int64_t one_row_words) {
  TORCH_CHECK(one_row_words == 2 || one_row_words == 4, "one_row_words is 2 or 4, got ", one_row_words);
  check_weights(w, scale, zero);
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kHalf && x.dim() == 2 && x.is_contiguous(),
              "x: a contiguous half CUDA matrix [m, k]");
  TORCH_CHECK(x.size(1) == w.size(1) * 8, "x has ", x.size(1), " columns, the weights ", w.size(1) * 8);
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 4, "rowquant_gemv takes 1 to 4 rows, got ", x.size(0));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
  const at::cuda::OptionalCUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  const int m = static_cast<int>(x.size(0));
  if (rows_per_warp == 2) {
    dispatch_rows<2>(m, static_cast<int>(one_row_words), x, w, scale, zero, out);
  } else if (rows_per_warp == 8) {
    dispatch_rows<8>(m, static_cast<int>(one_row_words), x, w, scale, zero, out);
  } else {
    dispatch_rows<4>(m, static_cast<int>(one_row_words), x, w, scale, zero, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor rowquant_mma(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor zero,
                           int64_t splits, int64_t tiles) {
  check_weights(w, scale, zero);
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kHalf && x.dim() == 2 && x.is_contiguous(),
              "x: a contiguous half CUDA matrix [m, k]");
  TORCH_CHECK(x.size(1) == w.size(1) * 8, "x has ", x.size(1), " columns, the weights ", w.size(1) * 8);
  TORCH_CHECK(x.size(1) % kMmaStep == 0, "rowquant_mma needs k to be a multiple of ", kMmaStep);
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 32, "rowquant_mma takes 1 to 32 rows, got ", x.size(0));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
  const at::cuda::OptionalCUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  const int s = static_cast<int>(splits);
  const int nt = static_cast<int>((x.size(0) + 7) / 8);
  if (tiles == 1) {
    switch (nt) {
      case 1: launch_mma<1, 1>(x, w, scale, zero, out, s); break;
      case 2: launch_mma<2, 1>(x, w, scale, zero, out, s); break;
      case 3: launch_mma<3, 1>(x, w, scale, zero, out, s); break;
      default: launch_mma<4, 1>(x, w, scale, zero, out, s); break;
    }
  } else {
    switch (nt) {
      case 1: launch_mma<1, 2>(x, w, scale, zero, out, s); break;
      case 2: launch_mma<2, 2>(x, w, scale, zero, out, s); break;
      case 3: launch_mma<3, 2>(x, w, scale, zero, out, s); break;
      default: launch_mma<4, 2>(x, w, scale, zero, out, s); break;
    }
  }
  return out;
}

template <int I>
void launch_dequant(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& zero,
                    torch::Tensor& out) {
  const size_t words = static_cast<size_t>(w.numel());
  const size_t per_block = static_cast<size_t>(kDequantThreads) * I;
  const unsigned blocks = static_cast<unsigned>((words + per_block - 1) / per_block);
  dequant_kernel<I><<<blocks, kDequantThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>()),
      reinterpret_cast<const half*>(scale.data_ptr<at::Half>()),
      reinterpret_cast<const half*>(zero.data_ptr<at::Half>()), reinterpret_cast<int4*>(out.data_ptr<at::Half>()),
      static_cast<int>(w.size(1)), words);
}

torch::Tensor rowquant_dequant(torch::Tensor w, torch::Tensor scale, torch::Tensor zero, int64_t items) {
  check_weights(w, scale, zero);
  const at::cuda::OptionalCUDAGuard guard(w.device());
  auto out = torch::empty({w.size(0), w.size(1) * 8}, scale.options());
  if (items == 1) {
    launch_dequant<1>(w, scale, zero, out);
  } else if (items == 8) {
    launch_dequant<8>(w, scale, zero, out);
  } else {
    launch_dequant<4>(w, scale, zero, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_dependent_launch", [](bool on) { dependent_launch_on() = on; },
        "the row kernel's launches as programmatic dependent launches (Hopper and later)");
  m.def("set_gemv_late_trigger", [](bool late) { gemv_late_trigger = late; },
        "the row kernel lets the next kernel launch once its blocks have summed, not once they have waited");
  m.def("gemv", &rowquant_gemv, "x [m<=4, k] times the row-packed 4-bit weights");
  m.def("mma", &rowquant_mma, "x [m<=32, k] times the row-packed 4-bit weights, on tensor cores");
  m.def("dequant", &rowquant_dequant, "the row-packed 4-bit weights as a half [n, k] matrix");
}
