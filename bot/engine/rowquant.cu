// Channelwise 4-bit GPTQ weights in a row layout (bot/engine/rowquant.py says
// what the layout is and why). Two kernels:
//
//   rowquant_gemv(x [m, k] half, w, scale, zero) -> [m, n] half, m <= 4:
//     one warp per R output rows, each lane reads 16 bytes (32 weights) of a
//     row at a time, so a warp reads 512 contiguous bytes; the products are
//     summed in half2 over one packed word (4 per lane, like Marlin's scaled
//     weights times x) and in float beyond; one warp shuffle reduction.
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

namespace {

constexpr int kWarps = 4;

__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));  // (a & mask) | magic
  return r;
}

__device__ __forceinline__ int4 load_once(const int4* p) {
  int4 r;
  asm("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// Slots j and j+4 of a word as half2 (q_j - z, q_j+4 - z) * s.
__device__ __forceinline__ half2 weights_pair(uint32_t word, int j, half2 zero2, half2 scale2) {
  uint32_t bits = and_or(word >> (4 * j), 0x000F000Fu, 0x64006400u);  // 1024 + q in each half
  return __hmul2(__hsub2(*reinterpret_cast<half2*>(&bits), zero2), scale2);
}

__device__ __forceinline__ uint32_t word_of(const int4& v, int i) {
  return static_cast<uint32_t>(i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w);
}

template <int M, int R>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(
    const int4* __restrict__ w, const half* __restrict__ scale, const half* __restrict__ zero,
    const int4* __restrict__ x, half* __restrict__ out, int n, int chunks) {
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * R;
  if (row0 >= n) return;
  const int4* wr[R];
  half2 zero2[R], scale2[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, n - 1);
    wr[r] = w + static_cast<size_t>(row) * chunks;
    zero2[r] = __half2half2(zero[row]);
    scale2[r] = __half2half2(scale[row]);
  }
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  int c = lane;
  int4 q[R];
  if (c < chunks) {
#pragma unroll
    for (int r = 0; r < R; ++r) q[r] = load_once(wr[r] + c);
  }
  while (c < chunks) {
    const int next = c + 32;
    int4 qn[R];
    if (next < chunks) {  // the next chunk's loads are in flight while this one is summed
#pragma unroll
      for (int r = 0; r < R; ++r) qn[r] = load_once(wr[r] + next);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int4 xv[M];
#pragma unroll
      for (int m = 0; m < M; ++m) xv[m] = __ldg(x + (static_cast<size_t>(m) * chunks + c) * 4 + i);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t word = word_of(q[r], i);
        half2 part[M];
#pragma unroll
        for (int m = 0; m < M; ++m) part[m] = __float2half2_rn(0.f);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const half2 wv = weights_pair(word, j, zero2[r], scale2[r]);
#pragma unroll
          for (int m = 0; m < M; ++m) part[m] = __hfma2(wv, reinterpret_cast<const half2*>(&xv[m])[j], part[m]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float2 f = __half22float2(part[m]);
          acc[r][m] += f.x + f.y;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) q[r] = qn[r];
    c = next;
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[r][m] = v;
    }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (row0 + r < n)
#pragma unroll
        for (int m = 0; m < M; ++m) out[static_cast<size_t>(m) * n + row0 + r] = __float2half_rn(acc[r][m]);
  }
}

// I words per thread, a block's threads side by side in each round (a warp
// reads 128 and writes 512 contiguous bytes per round), every round's loads
// issued before the first word is unpacked: with I = 4 a thread keeps 16
// bytes in flight instead of 4 (bench/gpu_prefill.py measures 1, 4 and 8).
constexpr int kDequantThreads = 256;

template <int I>
__global__ void __launch_bounds__(kDequantThreads) dequant_kernel(
    const uint32_t* __restrict__ w, const half* __restrict__ scale, const half* __restrict__ zero,
    int4* __restrict__ out, int words_per_row, size_t words) {
  const size_t base = static_cast<size_t>(blockIdx.x) * kDequantThreads * I + threadIdx.x;
  uint32_t word[I];
#pragma unroll
  for (int i = 0; i < I; ++i) {
    const size_t idx = base + static_cast<size_t>(i) * kDequantThreads;
    word[i] = idx < words ? __ldg(w + idx) : 0u;
  }
#pragma unroll
  for (int i = 0; i < I; ++i) {
    const size_t idx = base + static_cast<size_t>(i) * kDequantThreads;
    if (idx >= words) return;
    const int row = static_cast<int>(idx / words_per_row);
    const half2 zero2 = __half2half2(zero[row]);
    const half2 scale2 = __half2half2(scale[row]);
    half2 o[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) o[j] = weights_pair(word[i], j, zero2, scale2);
    out[idx] = *reinterpret_cast<int4*>(o);
  }
}

template <int M, int R>
void launch_gemv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                 const torch::Tensor& zero, torch::Tensor& out) {
  const int n = static_cast<int>(w.size(0));
  const int chunks = static_cast<int>(w.size(1) / 4);
  const int blocks = (n + kWarps * R - 1) / (kWarps * R);
  gemv_kernel<M, R><<<blocks, kWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const int4*>(w.data_ptr<int32_t>()),
      reinterpret_cast<const half*>(scale.data_ptr<at::Half>()),
      reinterpret_cast<const half*>(zero.data_ptr<at::Half>()),
      reinterpret_cast<const int4*>(x.data_ptr<at::Half>()),
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), n, chunks);
}

template <int R>
void dispatch_rows(int m, const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                   const torch::Tensor& zero, torch::Tensor& out) {
  switch (m) {
    case 1: launch_gemv<1, R>(x, w, scale, zero, out); break;
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

}  // namespace

torch::Tensor rowquant_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor zero,
                            int64_t rows_per_warp) {
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
    dispatch_rows<2>(m, x, w, scale, zero, out);
  } else if (rows_per_warp == 8) {
    dispatch_rows<8>(m, x, w, scale, zero, out);
  } else {
    dispatch_rows<4>(m, x, w, scale, zero, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  m.def("gemv", &rowquant_gemv, "x [m<=4, k] times the row-packed 4-bit weights");
  m.def("dequant", &rowquant_dequant, "the row-packed 4-bit weights as a half [n, k] matrix");
}
