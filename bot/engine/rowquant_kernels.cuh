// Device code of the row-layout 4-bit kernels (rowquant.cu holds the torch
// glue and says what each kernel is for). No torch headers here, so that
// nvcc alone compiles it: bench/rowquant_probe.cu times the kernels
// without a torch build, and ptxas -v checks them on a machine with no GPU.
#pragma once
#include <cuda_fp16.h>
#include <algorithm>
#include <cstdint>
#include <limits>

#include "dependent_launch.cuh"

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

// Slots j and j+4 of a word as half2 ((q_j - z) / 2^D, (q_j+4 - z) / 2^D),
// exact in half: a mask and an or put each code in the mantissa of 2^(10 - D)
// (ulp 2^-D), from which zero2 = (1024 + z) / 2^D is subtracted. D = 0 gives
// q - z (the zero as stored, 1024 + z); the row kernel takes D > 0.
template <int D = 0>
__device__ __forceinline__ half2 codes_pair(uint32_t word, int j, half2 zero2) {
  constexpr uint32_t kExp = static_cast<uint32_t>(25 - D) << 10;  // the half 2^(10 - D): 0x6400 = 1024 at D = 0
  uint32_t bits = and_or(word >> (4 * j), 0x000F000Fu, kExp | (kExp << 16));
  return __hsub2(*reinterpret_cast<half2*>(&bits), zero2);
}

__device__ __forceinline__ uint32_t word_of(const int4& v, int i) {
  return static_cast<uint32_t>(i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w);
}

// S - 1 chunks of each of a lane's R rows are in flight while it sums one.
// Deeper rings measured slower (bench/rowquant_probe.cu, docs/gpu-notes.md
// item 28): more registers, fewer warps, and no more bytes a second.
constexpr int kGemvStages = 2;

// Words whose products one half sum takes in the row kernel for m rows of x
// (docs/gpu-notes.md, items 30 and 32): two. Four at one row measured
// 0.16-0.19 ms a step faster at 80 layers in the probe (its -w4 variant); the
// glue (rowquant.cu) takes 2 or 4 at one row from rowquant.ONE_ROW_WORDS.
constexpr int gemv_words(int /*m*/) { return 2; }

// out[m][row] for M rows of x (1-4), a warp R rows of weights, the products of
// W words (4 W per half) summed in half2 and then added in float.
//
// LATE (the engine's): the weights are (q - z) / 2^D (codes_pair<D>, the zero
// scaled to match) with 2^D = 64 W, so a half sum of 4 W products is at most
// 4 W x 15 / (64 W) = 0.94 times the largest |x|: it cannot overflow for any
// finite half x. The row's scale
// (times 2^D) is applied once, to the float sum. Two FMA-pipe operations a
// pair (hsub2, hfma2) and one conversion per W words, where the kernel was
// bound by that pipe (item 28). Not LATE (W = 1 only): (q - z) * s before each
// pair meets x, as before; the probe keeps it as the same run's baseline.
//
// Launched as a dependent launch (dependent_launch.cuh), a block loads the
// first ring of its weights while the kernel before it still runs, and waits
// for it only before reading x. `late_trigger`: the kernel after it may
// launch once every block has summed its rows, not as soon as each has
// waited.
template <int M, int R, int S = kGemvStages, bool LATE = true, int W = gemv_words(M)>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(
    const int4* __restrict__ w, const half* __restrict__ scale, const half* __restrict__ zero,
    const int4* __restrict__ x, half* __restrict__ out, int n, int chunks, bool late_trigger = false) {
  static_assert(W == 1 || W == 2 || W == 4, "a chunk holds 4 words");
  static_assert(LATE || W == 1, "scaled pairs: one word a half sum");
  constexpr int kDown = W == 1 ? 6 : W == 2 ? 7 : 8;  // 2^kDown = 64 W
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * R;
  if (row0 >= n) return;
  const int4* wr[R];
  half2 zero2[R], scale2[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, n - 1);
    wr[r] = w + static_cast<size_t>(row) * chunks;
    zero2[r] = __half2half2(zero[row]);  // 1024 + z
    if constexpr (LATE) {
      zero2[r] = __hmul2(zero2[r], __float2half2_rn(1.f / (1 << kDown)));  // exact: a power of two
    } else {
      scale2[r] = __half2half2(scale[row]);
    }
  }
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  int4 q[S][R];  // a ring: chunk lane + 32 t sits in q[t % S]
#pragma unroll
  for (int t = 0; t < S - 1; ++t) {
    const int c = lane + 32 * t;
    if (c < chunks) {
#pragma unroll
      for (int r = 0; r < R; ++r) q[t][r] = load_once(wr[r] + c);
    }
  }
  wait_for_prior_kernels();  // x is the last kernel's output
  if (!late_trigger) dependents_may_launch();
  for (int base = lane; base < chunks; base += 32 * S) {
#pragma unroll
    for (int t = 0; t < S; ++t) {
      const int c = base + 32 * t;
      if (c >= chunks) break;
      const int ahead = c + 32 * (S - 1);
      if (ahead < chunks) {  // S - 1 chunks' loads are in flight while this one is summed
#pragma unroll
        for (int r = 0; r < R; ++r) q[(t + S - 1) % S][r] = load_once(wr[r] + ahead);
      }
#pragma unroll
      for (int i0 = 0; i0 < 4; i0 += W) {
        int4 xv[W][M];
#pragma unroll
        for (int i = 0; i < W; ++i)
#pragma unroll
          for (int m = 0; m < M; ++m) xv[i][m] = __ldg(x + (static_cast<size_t>(m) * chunks + c) * 4 + i0 + i);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          half2 part[M];
#pragma unroll
          for (int m = 0; m < M; ++m) part[m] = __float2half2_rn(0.f);
#pragma unroll
          for (int i = 0; i < W; ++i) {
            const uint32_t word = word_of(q[t][r], i0 + i);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              half2 wv;
              if constexpr (LATE) {
                wv = codes_pair<kDown>(word, j, zero2[r]);
              } else {
                wv = __hmul2(codes_pair(word, j, zero2[r]), scale2[r]);
              }
#pragma unroll
              for (int m = 0; m < M; ++m)
                part[m] = __hfma2(wv, reinterpret_cast<const half2*>(&xv[i][m])[j], part[m]);
            }
          }
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const float2 f = __half22float2(part[m]);
            acc[r][m] += f.x + f.y;
          }
        }
      }
    }
  }
  if (late_trigger) dependents_may_launch();
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
      if (row0 + r < n) {
        const float s = LATE ? __half2float(scale[row0 + r]) * (1 << kDown) : 1.f;
#pragma unroll
        for (int m = 0; m < M; ++m) out[static_cast<size_t>(m) * n + row0 + r] = __float2half_rn(acc[r][m] * s);
      }
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
    for (int j = 0; j < 4; ++j) o[j] = __hmul2(codes_pair(word[i], j, zero2), scale2);
    out[idx] = *reinterpret_cast<int4*>(o);
  }
}

// ---------------------------------------------------------------------------
// rowquant_mma(x [m, k] half, w, scale, zero, splits) -> [m, n] half, m <= 32:
// tensor cores (mma.sync m16n8k16, f32 sums) on the same row packing, for
// decode steps of a few rows, where the row kernel's CUDA-core sums grow with
// every row and Marlin reads its own second copy of the weights.
//
// k is cut into splits (mma_plan: the caller's number, raised where shared
// memory needs more, or its own choice); a block stages its split of x
// (every row) in shared memory once, then walks row groups of 256 outputs (blockIdx.x, + gridDim.x, ...: one
// block per multiprocessor), 16 warps of one 16-row tile each (TILES = 1) or
// 8 of two. A lane loads 16 bytes (32 codes) of each of its rows per
// half-step (the 4 lanes of a row: 64 contiguous bytes), two steps ahead of
// the one it multiplies.
//
// Fragments: mma's A operand wants, for lane (g = lane / 4, c = lane % 4),
// rows g and g + 8 at the tile's columns 2c, 2c + 1, 2c + 8, 2c + 9. Any
// bijection between the tile's 16 columns and 16 inputs serves, as long as x
// (operand B) goes through the same one. Column pair (2c, 2c + 1) of k-tile
// (h, i, s) is inputs base + 128h + 32c + 8i + 4s + {0, 1} (pair (2c + 8,
// 2c + 9): + {2, 3}): exactly the half2s that ``codes_bits(word, 2s)`` and
// ``(word, 2s + 1)`` make from word i of the lane's 16 bytes, and for x the
// 8 contiguous halves base + 128h + 32c + 8i + {0..7} give both k-tiles'
// (s = 0, 1) B fragments. Shared memory holds x in that fragment order, so a
// warp's read is one conflict-free 16-byte load per lane.
//
// The weight in the product is (q - z), exact in half; each output's sum (in
// float) is multiplied by its scale at the end. With several splits, each
// writes float partial sums and ``mma_finish_kernel`` adds them.
constexpr int kMmaRows = 256;  // a row group: 16 warps of one 16-row tile, or 8 of two
constexpr int kMmaSmem = 192 * 1024;  // bytes of staged x per block at most
constexpr int kMmaStep = 256;          // inputs per step

__device__ __forceinline__ uint32_t codes_bits(uint32_t word, int j, half2 zero2) {
  half2 v = codes_pair(word, j, zero2);  // q - z, exact, as a register operand
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ void mma16816(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int NT, int kMmaTiles>  // tiles of 8 rows of x; 16-row tiles per warp
__global__ void __launch_bounds__(kMmaRows / kMmaTiles * 2, 1) mma_kernel(
    const int4* __restrict__ w, const half* __restrict__ scale, const half* __restrict__ zero,
    const int4* __restrict__ x, half* __restrict__ out, float* __restrict__ part, int n, int k, int m,
    int span) {
  using Codes = int4[kMmaTiles][2][2];  // [tile][row g / g + 8][half-step]
  constexpr int kMmaWarps = kMmaRows / 16 / kMmaTiles;
  extern __shared__ int4 xs[];  // [step][h][i][NT][32 lanes] 16-byte fragments
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int chunks = k / 32;  // int4 per weight row
  const int k0 = blockIdx.y * span;
  const int steps = min(span, k - k0) / kMmaStep;
  {  // stage this split of x, every row, in fragment order
    const int cols = steps * (kMmaStep / 8);  // 16-byte chunks of a row
    for (int idx = threadIdx.x; idx < NT * 8 * cols; idx += kMmaWarps * 32) {
      const int row = idx / cols, j = idx % cols;
      const int st = j / 32, hh = (j / 16) & 1, cc = (j / 4) & 3, ii = j & 3;
      int4 v = make_int4(0, 0, 0, 0);
      if (row < m) v = __ldg(x + (static_cast<size_t>(row) * k + k0) / 8 + j);
      xs[(((st * 2 + hh) * 4 + ii) * NT + row / 8) * 32 + (row % 8) * 4 + cc] = v;
    }
  }
  __syncthreads();
  const int groups = (n + kMmaRows - 1) / kMmaRows;
  const int mine = (groups - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x;
  const int total = mine * steps;
  const int warp_row = (warp * kMmaTiles) * 16 + g;

  auto row_of = [&](int it, int t, int r) {
    return (blockIdx.x + (it / steps) * gridDim.x) * kMmaRows + warp_row + t * 16 + 8 * r;
  };
  auto load = [&](int it, Codes& q) {
    if (it >= total) return;
    const int col = k0 / 32 + (it % steps) * 8 + c;
#pragma unroll
    for (int t = 0; t < kMmaTiles; ++t)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int4* p = w + static_cast<size_t>(min(row_of(it, t, r), n - 1)) * chunks + col;
        q[t][r][0] = load_once(p);
        q[t][r][1] = load_once(p + 4);
      }
  };

  float acc[kMmaTiles][NT][4];
  half2 zero2[kMmaTiles][2];
  auto work = [&](int it, const Codes& q) {
    if (it >= total) return;
    const int st = it % steps;
    if (st == 0) {
#pragma unroll
      for (int t = 0; t < kMmaTiles; ++t) {
#pragma unroll
        for (int r = 0; r < 2; ++r) zero2[t][r] = __half2half2(zero[min(row_of(it, t, r), n - 1)]);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[t][j][e] = 0.f;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int4 xf[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) xf[j] = xs[(((st * 2 + h) * 4 + i) * NT + j) * 32 + lane];
        uint32_t a[kMmaTiles][2][4];  // every fragment of this k pair first, then the products
#pragma unroll
        for (int t = 0; t < kMmaTiles; ++t) {
          const uint32_t lo = word_of(q[t][0][h], i), hi = word_of(q[t][1][h], i);
#pragma unroll
          for (int sub = 0; sub < 2; ++sub) {
            a[t][sub][0] = codes_bits(lo, 2 * sub, zero2[t][0]);
            a[t][sub][1] = codes_bits(hi, 2 * sub, zero2[t][1]);
            a[t][sub][2] = codes_bits(lo, 2 * sub + 1, zero2[t][0]);
            a[t][sub][3] = codes_bits(hi, 2 * sub + 1, zero2[t][1]);
          }
        }
#pragma unroll
        for (int sub = 0; sub < 2; ++sub)  // kMmaTiles * NT products between two on one sum
#pragma unroll
          for (int t = 0; t < kMmaTiles; ++t)
#pragma unroll
            for (int j = 0; j < NT; ++j) {
              const uint32_t b0 = static_cast<uint32_t>(sub == 0 ? xf[j].x : xf[j].z);
              const uint32_t b1 = static_cast<uint32_t>(sub == 0 ? xf[j].y : xf[j].w);
              mma16816(acc[t][j], a[t][sub][0], a[t][sub][1], a[t][sub][2], a[t][sub][3], b0, b1);
            }
      }
    if (st != steps - 1) return;
    // acc[t][j]: (row g, x row 8j + 2c), (g, 8j + 2c + 1), (g + 8, 8j + 2c), (g + 8, 8j + 2c + 1)
#pragma unroll
    for (int t = 0; t < kMmaTiles; ++t)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row_of(it, t, r);
        if (row >= n) continue;
        const float sc = __half2float(scale[row]);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int xr = 8 * j + 2 * c;
          const float v0 = acc[t][j][2 * r], v1 = acc[t][j][2 * r + 1];
          if (gridDim.y == 1) {
            if (xr < m) out[static_cast<size_t>(xr) * n + row] = __float2half_rn(v0 * sc);
            if (xr + 1 < m) out[static_cast<size_t>(xr + 1) * n + row] = __float2half_rn(v1 * sc);
          } else {
            *reinterpret_cast<float2*>(part + (static_cast<size_t>(blockIdx.y) * n + row) * (NT * 8) + xr) =
                make_float2(v0, v1);
          }
        }
      }
  };

  // three buffers: step it multiplies while it + 1 and it + 2 are in flight
  Codes qa, qb, qc;
  load(0, qa);
  load(1, qb);
  for (int it = 0; it < total; it += 3) {
    load(it + 2, qc);
    work(it, qa);
    load(it + 3, qa);
    work(it + 1, qb);
    load(it + 4, qb);
    work(it + 2, qc);
  }
}

// out[r][o] = scale[o] * the sum of the splits' partial sums part[s][o][r]:
// a block takes 32 outputs, reads their np partial sums each as one
// contiguous run (every thread busy, whatever np) and writes along o
// (contiguous) through a shared-memory tile.
constexpr int kFinishOutputs = 32;

__global__ void __launch_bounds__(256) mma_finish_kernel(const float* __restrict__ part,
                                                         const half* __restrict__ scale, half* __restrict__ out,
                                                         int n, int m, int np, int splits) {
  __shared__ float tile[kFinishOutputs][kFinishOutputs + 1];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int o0 = blockIdx.x * kFinishOutputs;
  for (int idx = threadIdx.x; idx < kFinishOutputs * np; idx += 256) {
    const int oo = idx / np, r = idx % np, o = o0 + oo;
    float v = 0.f;
    if (o < n)
      for (int s = 0; s < splits; ++s) v += part[(static_cast<size_t>(s) * n + o0) * np + idx];
    tile[oo][r] = v;
  }
  __syncthreads();
  const int o = o0 + tx;
  if (o >= n) return;
  const float sc = __half2float(scale[o]);
  for (int r = ty; r < m; r += 8) out[static_cast<size_t>(r) * n + o] = __float2half_rn(tile[tx][r] * sc);
}


// ---------------------------------------------------------------------------
// How a tensor-core kernel cuts a product: k into `splits` of `span` inputs
// (grid.y), `blocks` blocks a split (grid.x), `smem` bytes of staged x.
struct KPlan {
  int splits, span, blocks, smem;
};

// How to cut k (`steps` of 256 inputs, `step_bytes` of staged x each, at most
// `max_steps` a split) for `units` units of work (row groups), one block per
// multiprocessor and split, at most `max_blocks` blocks a split: the caller's
// splits, raised where max_steps needs more, or (splits <= 0) the count whose
// busiest block has the least to read (ceil(units / blocks) units of `per`
// steps), `split_cost` more a split for the partial sums it writes and the
// finish step reads.
inline KPlan split_plan(int steps, int max_steps, int step_bytes, int units, int max_blocks, int sms, int splits,
                        double split_cost) {
  auto plan = [&](int per) {
    const int used = (steps + per - 1) / per;
    return KPlan{used, per * kMmaStep, std::max(1, std::min(max_blocks, sms / used)), per * step_bytes};
  };
  if (splits > 0) {
    splits = std::min(splits, steps);
    return plan(std::min(max_steps, (steps + splits - 1) / splits));
  }
  KPlan best{};
  double best_cost = std::numeric_limits<double>::infinity();
  for (int per = std::min(max_steps, steps); per >= 1; --per) {  // ties: fewer splits
    const KPlan p = plan(per);
    const int rounds = (units + p.blocks - 1) / p.blocks;
    const double cost = rounds * per * (1.0 + split_cost * (p.splits - 1));
    if (cost < best_cost) {
      best = p;
      best_cost = cost;
    }
  }
  return best;
}

// mma_kernel's plan: row groups of kMmaRows, kMmaSmem of staged x, 1 % a split.
inline KPlan mma_plan(int n, int k, int nt, int sms, int splits) {
  const int step_bytes = nt * 4096;  // staged x per step of 256 inputs
  const int groups = (n + kMmaRows - 1) / kMmaRows;
  return split_plan(k / kMmaStep, kMmaSmem / step_bytes, step_bytes, groups, groups, sms, splits, 0.01);
}

// The splits' partial sums (part [splits][n][stride]) into out, where there are several.
inline cudaError_t finish_splits(const KPlan& pl, const float* part, const half* scale, half* out, int n, int m,
                                 int stride, cudaStream_t stream) {
  if (pl.splits > 1)
    mma_finish_kernel<<<(n + kFinishOutputs - 1) / kFinishOutputs, 256, 0, stream>>>(part, scale, out, n, m, stride,
                                                                                     pl.splits);
  return cudaGetLastError();
}

// The launches (part: splits * n * 8 * NT floats when splits > 1).
template <int NT, int TILES>
inline cudaError_t mma_launch(const KPlan& pl, const int4* w, const half* scale, const half* zero, const int4* x,
                              half* out, float* part, int n, int k, int m, cudaStream_t stream) {
  static bool raised = false;  // once per instantiation
  if (!raised) {
    const cudaError_t e =
        cudaFuncSetAttribute(mma_kernel<NT, TILES>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMmaSmem);
    if (e != cudaSuccess) return e;
    raised = true;
  }
  mma_kernel<NT, TILES><<<dim3(pl.blocks, pl.splits), kMmaRows / TILES * 2, pl.smem, stream>>>(
      w, scale, zero, x, out, part, n, k, m, pl.span);
  return finish_splits(pl, part, scale, out, n, m, NT * 8, stream);
}

}  // namespace
