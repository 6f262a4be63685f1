// The row-layout kernels alone, without torch: nvcc builds this in seconds,
// where the extension takes over a minute, so a kernel's GPU runs cost
// little device time. bench/gpu-call.sh probe builds and runs it:
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o probe bench/rowquant_probe.cu
//   ./probe [reps]
//   ncu --clock-control none --set full ./probe profile   # each kernel once a shape
//
// For the 70B model's four products (8 distinct copies each, so that L2 holds
// none of them between uses) it checks every kernel against a plain float
// reference at 1..32 rows of x (the row kernels also with outliers of 8,000
// in x); times the 80 layers' products per kernel and row count, with the row
// kernel's loads alone as the floor of its access pattern; and times each
// product a second time right after itself, its weights then in L2 as far as
// they fit (docs/gpu-notes.md, items 27-30).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../bot/engine/rowquant_kernels.cuh"
#include "cuda_check.h"

namespace {

// ---------------------------------------------------------------------------
// Under trial, not in the engine: wg_kernel, the product on Hopper's
// warpgroup instructions (wgmma.mma_async m64nNk16, N = 8 * NT rows of x,
// sm_90a). mma.sync at 32 rows looked bound by its own issue rate
// (docs/gpu-notes.md, item 24; the profiler later said not, item 28): four
// m16n8k16 and their B loads per 16 inputs per warp, where one wgmma takes a
// warpgroup's 64 outputs times every row of x, B straight from shared memory.
//
// A (the weights) comes from registers, in exactly mma.sync's A fragment
// layout per warp (warp w of the group: outputs 16w..16w+15), so the lanes
// load and unpack their codes as mma_kernel does: the same bijection between
// a k-tile's 16 columns and 16 inputs. B (x) sits in shared memory in the
// canonical K-major layout without swizzle: per k-tile, per 8 rows of x, two
// 8x8 core matrices (columns 0-7, 8-15) of 8 rows x 16 bytes; column 2c + e
// of core 0 is input base + 32c + e, of core 1 input base + 32c + 2 + e
// (base = 128h + 8i + 4s, mma_kernel's comment), so x is staged as 4-byte
// pairs. Descriptor: leading offset (core 0 -> core 1) 128 bytes, stride
// offset (8 rows -> the next 8) 256 bytes.
//
// A block is WG warpgroups; row group u (64 outputs) goes to block u %
// gridDim.x, warpgroup (u / gridDim.x) % WG, so every block's load differs
// by at most one group. Each half-step (128 inputs) issues 8 wgmmas as one
// group while the next half-step's codes are unpacked (one group in flight).
// Splits of k and the finish kernel as mma_kernel's. The weights go through
// shared memory: each lane copies its own 64 bytes a step with cp.async into
// a ring of S slots and reads them back just before it unpacks them, so S - 1
// steps are in flight without holding registers. No barrier: a lane reads
// only what it copied. (Loading into registers, as mma_kernel does, was
// slower still: docs/gpu-notes.md, item 27.)

constexpr int kWgRows = 64;            // outputs of one warpgroup's tile

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

template <int NT>  // the accumulators are read only after the wait before this
__device__ __forceinline__ void wg_keep(float (&d)[4 * NT]) {
#pragma unroll
  for (int i = 0; i < 4 * NT; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <int NT>
__device__ __forceinline__ void wg_mma(float (&d)[4 * NT], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (NT == 1) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
  }
  if constexpr (NT == 2) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
  }
  if constexpr (NT == 3) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %17, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n24k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}, {%12, %13, %14, %15}, %16, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
  }
  if constexpr (NT == 4) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
  }
}

// The split count whose busiest block has the least to read, 2 % more a
// split for the partial sums; `budget` bytes of shared memory for x, a block
// takes WG row groups at once.
inline KPlan wg_plan(int n, int k, int nt, int wgs, int sms, int budget) {
  const int step_bytes = nt * 4096;  // staged x per step of 256 inputs
  const int groups = (n + kWgRows - 1) / kWgRows;
  return split_plan(k / kMmaStep, budget / step_bytes, step_bytes, groups, (groups + wgs - 1) / wgs, sms, 0, 0.02);
}

constexpr int kSmemMax = 227 * 1024;  // dynamic shared memory a block may have (H100/H200)

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <int WG, int S>
__host__ __device__ constexpr int wg_ring_bytes() { return S * 4 * WG * 128 * 16; }

template <int NT, int WG, int S>
__global__ void __launch_bounds__(WG * 128, 1) wg_kernel(
    const int4* __restrict__ w, const half* __restrict__ scale, const half* __restrict__ zero,
    const half* __restrict__ x, half* __restrict__ out, float* __restrict__ part, int n, int k, int m,
    int span) {
  using Codes = int4[2][2];  // [row g / g + 8][half-step]
  constexpr int kThreads = WG * 128;
  extern __shared__ __align__(128) uint32_t smem[];
  int4* ring = reinterpret_cast<int4*>(smem);  // [S][row r, half h][kThreads]
  uint32_t* xw = smem + wg_ring_bytes<WG, S>() / 4;  // [k-tile][NT][core][8 rows][4 pairs]
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = (tid >> 5) & 3;
  const int grp = __shfl_sync(0xffffffffu, static_cast<int>(tid >> 7), 0);
  const int g = lane >> 2, c = lane & 3;
  const int chunks = k / 32;
  const int k0 = blockIdx.y * span;
  const int steps = min(span, k - k0) / kMmaStep;
  const int groups = (n + kWgRows - 1) / kWgRows;
  const int first = blockIdx.x + grp * gridDim.x, stride = gridDim.x * WG;
  const int mine = first < groups ? (groups - first + stride - 1) / stride : 0;
  const int total = mine * steps;
  const uint32_t ring_base = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

  auto row_of = [&](int it, int r) { return (first + (it / steps) * stride) * kWgRows + 16 * warp + g + 8 * r; };
  auto issue = [&](int it) {
    if (it < total) {
      const int slot = it % S;
      const int col = k0 / 32 + (it % steps) * 8 + c;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int4* p = w + static_cast<size_t>(min(row_of(it, r), n - 1)) * chunks + col;
#pragma unroll
        for (int h = 0; h < 2; ++h) cp_async16(ring_base + ((slot * 4 + 2 * r + h) * kThreads + tid) * 16, p + 4 * h);
      }
    }
    cp_commit();  // empty past the end: the group count stays one a step
  };
#pragma unroll
  for (int t = 0; t < S - 1; ++t) issue(t);  // in flight while x is staged
  {
    const int pairs = steps * kMmaStep / 2;
    for (int idx = tid; idx < NT * 8 * pairs; idx += kThreads) {
      const int row = idx / pairs, q = 2 * (idx % pairs);
      const int st = q >> 8, h = (q >> 7) & 1, cc = (q >> 5) & 3, i = (q >> 3) & 3, s = (q >> 2) & 1,
                e = (q >> 1) & 1;
      const int kt = st * 16 + h * 8 + i * 2 + s;
      uint32_t v = 0;
      if (row < m) v = __ldg(reinterpret_cast<const uint32_t*>(x + static_cast<size_t>(row) * k + k0 + q));
      xw[(((kt * NT + row / 8) * 2 + e) * 8 + row % 8) * 4 + cc] = v;
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
  __syncthreads();
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(xw));
  const uint64_t desc0 = static_cast<uint64_t>((base & 0x3FFFF) >> 4) | (static_cast<uint64_t>(128 >> 4) << 16) |
                         (static_cast<uint64_t>(256 >> 4) << 32);

  float acc[4 * NT];
#pragma unroll
  for (int e = 0; e < 4 * NT; ++e) acc[e] = 0.f;
  half2 zero2[2];
  for (int it = 0; it < total; ++it) {
    cp_wait<S - 2>();  // step it's copies have landed
    Codes q;
    const int slot = it % S;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) q[r][h] = ring[(slot * 4 + 2 * r + h) * kThreads + tid];
    issue(it + S - 1);  // into the slot read a step ago
    const int st = it % steps;
    if (st == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) zero2[r] = __half2half2(zero[min(row_of(it, r), n - 1)]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t a[8][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t lo = word_of(q[0][h], i), hi = word_of(q[1][h], i);
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          a[2 * i + s][0] = codes_bits(lo, 2 * s, zero2[0]);
          a[2 * i + s][1] = codes_bits(hi, 2 * s, zero2[1]);
          a[2 * i + s][2] = codes_bits(lo, 2 * s + 1, zero2[0]);
          a[2 * i + s][3] = codes_bits(hi, 2 * s + 1, zero2[1]);
        }
      }
      wg_fence();
#pragma unroll
      for (int t = 0; t < 8; ++t)
        wg_mma<NT>(acc, a[t], desc0 + static_cast<uint64_t>((st * 16 + h * 8 + t) * NT * 16));
      wg_commit();
      wg_wait<1>();
    }
    if (st == steps - 1) {
      wg_wait<0>();
      wg_keep<NT>(acc);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row_of(it, r);
        if (row >= n) continue;
        const float sc = __half2float(scale[row]);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int xr = 8 * j + 2 * c;
          const float v0 = acc[4 * j + 2 * r], v1 = acc[4 * j + 2 * r + 1];
          if (gridDim.y == 1) {
            if (xr < m) out[static_cast<size_t>(xr) * n + row] = __float2half_rn(v0 * sc);
            if (xr + 1 < m) out[static_cast<size_t>(xr + 1) * n + row] = __float2half_rn(v1 * sc);
          } else {
            *reinterpret_cast<float2*>(part + (static_cast<size_t>(blockIdx.y) * n + row) * (NT * 8) + xr) =
                make_float2(v0, v1);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < 4 * NT; ++e) acc[e] = 0.f;
    }
  }
  wg_wait<0>();
  cp_wait<0>();
}

template <int NT, int WG, int S>
inline cudaError_t wg_launch(const int4* w, const half* scale, const half* zero, const half* x, half* out,
                              float* part, int n, int k, int m, int sms, cudaStream_t stream) {
  constexpr int ring = wg_ring_bytes<WG, S>();
  const KPlan pl = wg_plan(n, k, NT, WG, sms, kSmemMax - ring);
  static bool raised = false;
  if (!raised) {
    const cudaError_t e =
        cudaFuncSetAttribute(wg_kernel<NT, WG, S>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemMax);
    if (e != cudaSuccess) return e;
    raised = true;
  }
  wg_kernel<NT, WG, S><<<dim3(pl.blocks, pl.splits), WG * 128, ring + pl.smem, stream>>>(w, scale, zero, x, out,
                                                                                        part, n, k, m, pl.span);
  return finish_splits(pl, part, scale, out, n, m, NT * 8, stream);
}

// gemv_kernel's loads alone (same grid, warps, rows and ring, no arithmetic
// but an xor): how fast its access pattern reads, whatever the sums cost.
template <int R, int S>
__global__ void __launch_bounds__(kWarps * 32) loads_kernel(const int4* __restrict__ w, half* __restrict__ out,
                                                            int n, int chunks) {
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * R;
  if (row0 >= n) return;
  const int4* wr[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wr[r] = w + static_cast<size_t>(min(row0 + r, n - 1)) * chunks;
  uint32_t acc = 0;
  int4 q[S][R];
#pragma unroll
  for (int t = 0; t < S - 1; ++t)
    if (lane + 32 * t < chunks)
#pragma unroll
      for (int r = 0; r < R; ++r) q[t][r] = load_once(wr[r] + lane + 32 * t);
  for (int base = lane; base < chunks; base += 32 * S) {
#pragma unroll
    for (int t = 0; t < S; ++t) {
      const int c = base + 32 * t;
      if (c >= chunks) break;
      if (c + 32 * (S - 1) < chunks)
#pragma unroll
        for (int r = 0; r < R; ++r) q[(t + S - 1) % S][r] = load_once(wr[r] + c + 32 * (S - 1));
#pragma unroll
      for (int r = 0; r < R; ++r) acc ^= q[t][r].x ^ q[t][r].y ^ q[t][r].z ^ q[t][r].w;
    }
  }
  if (acc == 0x12345678u) out[row0] = __float2half(1.f);  // never, but the loads must stay
}

// ---------------------------------------------------------------------------

struct Shape {
  const char* name;
  int n, k;
};
// Xwin-LM-70B (Llama 2 70B): hidden 8192, 64 heads of 128, 8 kv heads, mlp 28672; fused as the engine runs them.
const Shape kShapes[] = {{"qkv", 10240, 8192}, {"o", 8192, 8192}, {"gate_up", 57344, 8192}, {"down", 8192, 28672}};
constexpr int kCopies = 8;
constexpr int kMaxRows = 32;

__device__ uint32_t mix(uint64_t v) {
  v ^= v >> 33;
  v *= 0xff51afd7ed558ccdULL;
  v ^= v >> 33;
  v *= 0xc4ceb9fe1a85ec53ULL;
  v ^= v >> 33;
  return static_cast<uint32_t>(v);
}

__global__ void fill_words(uint32_t* w, size_t count, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    w[i] = mix(seed * 0x9E3779B97F4A7C15ULL + i);
}

__global__ void fill_rows(half* scale, half* zero, int n, uint64_t seed) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t r = mix(seed + 7 * i);
  scale[i] = __float2half(0.002f + 0.02f * (r & 1023) / 1023.f);
  zero[i] = __float2half(1024.f + ((r >> 10) & 15));
}

__global__ void fill_x(half* x, size_t count, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] = __float2half((mix(seed + i) & 0xFFFF) / 32768.f - 1.f);
}

// x with outliers of magnitude 8,000, eight inputs in a row every 4,096 (a
// word's worth): the row kernels' half sums of a word must not overflow
// (unscaled, 4 x 15 x 8,000 would), while the outputs stay within half.
__global__ void fill_x_outliers(half* x, size_t count, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    if (i % 4096 < 8) x[i] = __float2half((mix(seed + i) & 1) ? 8000.f : -8000.f);
}

// out[r][o] = scale[o] * sum_k x[r][k] (q[o][k] - z[o]) in float: one block per output.
__global__ void reference_kernel(const uint32_t* w, const half* scale, const half* zero, const half* x, float* out,
                                 int n, int k, int m) {
  __shared__ float red[kMaxRows][8];
  const int o = blockIdx.x;
  const int words = k / 8;
  float acc[kMaxRows] = {};
  const float z = __half2float(zero[o]) - 1024.f;
  for (int j = threadIdx.x; j < words; j += blockDim.x) {
    const uint32_t word = w[static_cast<size_t>(o) * words + j];
    for (int slot = 0; slot < 8; ++slot) {
      const int input = 8 * j + (slot < 4 ? 2 * slot : 2 * (slot - 4) + 1);  // ORDER = 0,2,4,6,1,3,5,7
      const float q = static_cast<float>((word >> (4 * slot)) & 15) - z;
      for (int r = 0; r < m; ++r) acc[r] += q * __half2float(x[static_cast<size_t>(r) * k + input]);
    }
  }
  for (int r = 0; r < m; ++r) {
    float v = acc[r];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if ((threadIdx.x & 31) == 0) red[r][threadIdx.x >> 5] = v;
  }
  __syncthreads();
  if (threadIdx.x < m) {
    float v = 0.f;
    for (int i = 0; i < static_cast<int>(blockDim.x) / 32; ++i) v += red[threadIdx.x][i];
    out[static_cast<size_t>(threadIdx.x) * n + o] = v * __half2float(scale[o]);
  }
}

struct Layer {
  uint32_t* w;
  half *scale, *zero;
};

struct Weights {
  Shape shape;
  Layer layer[kCopies];
  size_t bytes() const {
    return static_cast<size_t>(shape.n) * shape.k / 2 + 4 * static_cast<size_t>(shape.n);
  }
};

int g_sms = 0;
float* g_part = nullptr;  // partial sums of the splits

// ---------------------------------------------------------------------------

// The engine's kernels (gemv: rows a warp x stages), the trial and the floor.
// gemv4x2: the engine's row kernel (rows a warp x stages; gemv_words(m)
// words a half sum, the scale applied to the float sums); -scaled: the scale
// on every pair as before item 30 (docs/gpu-notes.md), the same run's
// baseline; -w1 / -w2 / -w4: one, two or four words a half sum at every m;
// gemv4x3, gemv2x2, gemv8x2: the engine's arithmetic with another ring depth
// or rows a warp (their outputs must equal gemv4x2's bit for bit).
enum Kernel { kGemv, kGemvScaled, kGemvW1, kGemvW2, kGemvW4, kGemv3, kGemv2, kGemv8, kMma, kMmaAuto, kWg, kLoads };
const char* kKernelNames[] = {"gemv4x2",    "gemv4x2-scaled", "gemv4x2-w1", "gemv4x2-w2", "gemv4x2-w4", "gemv4x3",
                              "gemv2x2",    "gemv8x2",        "mma",        "mma-auto",   "wg4x3",      "loads4x2"};

bool is_gemv(Kernel k) { return k <= kGemv8; }

// W = 0: the engine's words a half sum for m (gemv_words)
template <int S, bool LATE = true, int W = 0, int R = 4>
void run_gemv(const Layer& l, const Shape& s, const half* x, half* out, int m) {
  const dim3 grid((s.n + kWarps * R - 1) / (kWarps * R)), block(kWarps * 32);
  const int4* w = reinterpret_cast<const int4*>(l.w);
  const int4* xv = reinterpret_cast<const int4*>(x);
  constexpr int w1 = W ? W : gemv_words(1), w2 = W ? W : gemv_words(2), w3 = W ? W : gemv_words(3),
                w4 = W ? W : gemv_words(4);
  if (m == 1) gemv_kernel<1, R, S, LATE, w1><<<grid, block>>>(w, l.scale, l.zero, xv, out, s.n, s.k / 32);
  else if (m == 2) gemv_kernel<2, R, S, LATE, w2><<<grid, block>>>(w, l.scale, l.zero, xv, out, s.n, s.k / 32);
  else if (m == 3) gemv_kernel<3, R, S, LATE, w3><<<grid, block>>>(w, l.scale, l.zero, xv, out, s.n, s.k / 32);
  else gemv_kernel<4, R, S, LATE, w4><<<grid, block>>>(w, l.scale, l.zero, xv, out, s.n, s.k / 32);
}

void run(Kernel kern, const Layer& l, const Shape& s, const half* x, half* out, int m) {
  const int nt = (m + 7) / 8;
  const int4* w = reinterpret_cast<const int4*>(l.w);
  cudaError_t e = cudaSuccess;
  if (is_gemv(kern)) {
    if (kern == kGemv) run_gemv<2>(l, s, x, out, m);
    else if (kern == kGemvScaled) run_gemv<2, false, 1>(l, s, x, out, m);
    else if (kern == kGemvW1) run_gemv<2, true, 1>(l, s, x, out, m);
    else if (kern == kGemvW2) run_gemv<2, true, 2>(l, s, x, out, m);
    else if (kern == kGemvW4) run_gemv<2, true, 4>(l, s, x, out, m);
    else if (kern == kGemv2) run_gemv<2, true, 0, 2>(l, s, x, out, m);
    else if (kern == kGemv8) run_gemv<2, true, 0, 8>(l, s, x, out, m);
    else run_gemv<3>(l, s, x, out, m);
    e = cudaGetLastError();
  } else if (kern == kLoads) {
    loads_kernel<4, 2><<<(s.n + kWarps * 4 - 1) / (kWarps * 4), kWarps * 32>>>(w, out, s.n, s.k / 32);
    e = cudaGetLastError();
  } else if (kern == kMma || kern == kMmaAuto) {
    const int4* xv = reinterpret_cast<const int4*>(x);
    const KPlan pl = mma_plan(s.n, s.k, nt, g_sms, kern == kMma ? 4 : 0);  // 4 splits, or the plan's choice
    if (nt == 1) e = mma_launch<1, 1>(pl, w, l.scale, l.zero, xv, out, g_part, s.n, s.k, m, nullptr);
    else if (nt == 2) e = mma_launch<2, 1>(pl, w, l.scale, l.zero, xv, out, g_part, s.n, s.k, m, nullptr);
    else if (nt == 3) e = mma_launch<3, 1>(pl, w, l.scale, l.zero, xv, out, g_part, s.n, s.k, m, nullptr);
    else e = mma_launch<4, 1>(pl, w, l.scale, l.zero, xv, out, g_part, s.n, s.k, m, nullptr);
  } else {
    if (nt == 1) e = wg_launch<1, 4, 3>(w, l.scale, l.zero, x, out, g_part, s.n, s.k, m, g_sms, nullptr);
    else if (nt == 2) e = wg_launch<2, 4, 3>(w, l.scale, l.zero, x, out, g_part, s.n, s.k, m, g_sms, nullptr);
    else if (nt == 3) e = wg_launch<3, 4, 3>(w, l.scale, l.zero, x, out, g_part, s.n, s.k, m, g_sms, nullptr);
    else e = wg_launch<4, 4, 3>(w, l.scale, l.zero, x, out, g_part, s.n, s.k, m, g_sms, nullptr);
  }
  CHECK(e);
}

float max_abs(const std::vector<float>& v) {
  float r = 0.f;
  for (float f : v) r = std::fmax(r, std::fabs(f));
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const bool profile = argc > 1 && std::string(argv[1]) == "profile";
  const int reps = argc > 1 && !profile ? std::atoi(argv[1]) : 20;
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  g_sms = prop.multiProcessorCount;
  std::printf("device %s, %d SMs, L2 %d MB\n", prop.name, g_sms, prop.l2CacheSize >> 20);

  std::vector<Weights> ws;
  uint64_t seed = 1;
  for (const Shape& s : kShapes) {
    Weights wt{s, {}};
    for (auto& l : wt.layer) {
      const size_t words = static_cast<size_t>(s.n) * s.k / 8;
      CHECK(cudaMalloc(&l.w, words * 4));
      CHECK(cudaMalloc(&l.scale, s.n * sizeof(half)));
      CHECK(cudaMalloc(&l.zero, s.n * sizeof(half)));
      fill_words<<<1024, 256>>>(l.w, words, seed++);
      fill_rows<<<(s.n + 255) / 256, 256>>>(l.scale, l.zero, s.n, seed++);
    }
    ws.push_back(wt);
  }
  const int max_k = 28672, max_n = 57344;
  half *x, *out;
  float* ref;
  CHECK(cudaMalloc(&x, static_cast<size_t>(kMaxRows) * max_k * sizeof(half)));
  CHECK(cudaMalloc(&out, static_cast<size_t>(kMaxRows) * max_n * sizeof(half)));
  CHECK(cudaMalloc(&ref, static_cast<size_t>(kMaxRows) * max_n * sizeof(float)));
  CHECK(cudaMalloc(&g_part, static_cast<size_t>(32) * max_n * kMaxRows * sizeof(float)));
  fill_x<<<1024, 256>>>(x, static_cast<size_t>(kMaxRows) * max_k, 99);
  CHECK(cudaDeviceSynchronize());
  if (profile) {  // for a profiler: each kernel once a shape, at the row counts the engine gives it
    for (const Weights& wt : ws) {
      run(kGemv, wt.layer[0], wt.shape, x, out, 1);
      run(kGemvScaled, wt.layer[0], wt.shape, x, out, 1);
      run(kLoads, wt.layer[0], wt.shape, x, out, 1);
      run(kMma, wt.layer[0], wt.shape, x, out, 8);
      run(kMma, wt.layer[0], wt.shape, x, out, 32);
    }
    CHECK(cudaDeviceSynchronize());
    std::printf("profiled\n");
    return 0;
  }

  // correctness: every kernel, every shape, several row counts, against the float reference
  const int check_rows[] = {1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 31, 32};
  const Kernel kernels[] = {kGemv, kGemvScaled, kGemvW1, kGemvW2, kGemvW4, kGemv3, kGemv2, kGemv8, kMma, kMmaAuto, kWg};
  const Kernel timed[] = {kGemv, kGemvScaled, kGemvW1, kGemvW2, kGemvW4, kGemv3, kGemv2, kGemv8, kMma, kMmaAuto, kWg, kLoads};
  for (const Shape& s : kShapes)
    for (int nt = 1; nt <= 4; ++nt)
      std::printf("plan %-7s rows %2d-%2d: %d splits\n", s.name, 8 * nt - 7, 8 * nt, mma_plan(s.n, s.k, nt, g_sms, 0).splits);
  half* x_big;  // x with outliers
  CHECK(cudaMalloc(&x_big, static_cast<size_t>(kMaxRows) * max_k * sizeof(half)));
  CHECK(cudaMemcpy(x_big, x, static_cast<size_t>(kMaxRows) * max_k * sizeof(half), cudaMemcpyDeviceToDevice));
  fill_x_outliers<<<1024, 256>>>(x_big, static_cast<size_t>(kMaxRows) * max_k, 7);
  for (const Weights& wt : ws) {
    const Shape& s = wt.shape;
    for (int big = 0; big < 2; ++big)
    for (int m : check_rows) {
      if (big && m > 4) continue;  // outliers: the row kernels
      const half* xin = big ? x_big : x;
      reference_kernel<<<s.n, 256>>>(wt.layer[0].w, wt.layer[0].scale, wt.layer[0].zero, xin, ref, s.n, s.k, m);
      std::vector<float> r(static_cast<size_t>(m) * s.n);
      CHECK(cudaMemcpy(r.data(), ref, r.size() * 4, cudaMemcpyDeviceToHost));
      const float scale = max_abs(r);
      std::vector<half> engine_out;
      for (Kernel kern : kernels) {
        if ((is_gemv(kern) && m > 4) || (big && !is_gemv(kern))) continue;
        CHECK(cudaMemset(out, 0xFF, static_cast<size_t>(m) * s.n * sizeof(half)));  // NaN: unwritten shows
        run(kern, wt.layer[0], s, xin, out, m);
        CHECK(cudaDeviceSynchronize());
        std::vector<half> o(static_cast<size_t>(m) * s.n);
        CHECK(cudaMemcpy(o.data(), out, o.size() * sizeof(half), cudaMemcpyDeviceToHost));
        float err = 0.f;
        for (size_t i = 0; i < o.size(); ++i) {
          const float d = std::fabs(__half2float(o[i]) - r[i]);
          err = std::isnan(d) ? INFINITY : std::fmax(err, d);
        }
        bool differs = false;  // the engine's arithmetic, scheduled otherwise: the same bits
        if (kern == kGemv) engine_out = o;
        if (kern == kGemv3 || kern == kGemv2 || kern == kGemv8)
          differs = std::memcmp(o.data(), engine_out.data(), o.size() * sizeof(half)) != 0;
        std::printf("check %-7s rows %2d%s %-4s rel.err %.2e%s%s\n", s.name, m, big ? " outliers" : "",
                    kKernelNames[kern], err / scale, err / scale < 2e-3f ? "" : "  WRONG",
                    differs ? "  NOT BITWISE gemv4x2's" : "");
      }
    }
  }

  // timing: the 80 layers' products (each shape's per-layer time x 80), per kernel and row count
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  const int time_rows[] = {1, 2, 4, 8, 16, 24, 32};
  for (int m : time_rows) {
    for (Kernel kern : timed) {
      if ((is_gemv(kern) && m > 4) || (kern == kLoads && m > 1)) continue;
      double total_us = 0;
      std::printf("time rows %2d %-4s", m, kKernelNames[kern]);
      for (const Weights& wt : ws) {
        for (int i = 0; i < kCopies; ++i) run(kern, wt.layer[i], wt.shape, x, out, m);  // warm
        CHECK(cudaEventRecord(e0));
        for (int rep = 0; rep < reps; ++rep)
          for (int i = 0; i < kCopies; ++i) run(kern, wt.layer[i], wt.shape, x, out, m);
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        const double us = 1000.0 * ms / (reps * kCopies);
        total_us += us;
        std::printf("  %s %.1f us (%.2f TB/s)", wt.shape.name, us, wt.bytes() / us / 1e6);
      }
      std::printf("  | 80 layers %.2f ms\n", total_us * 80 / 1000);
    }
  }

  // L2: the same product twice in a row (the second finds its weights in L2
  // as far as they fit), against once
  for (const Weights& wt : ws) {
    for (int m : {1, 16, 32}) {
      const Kernel kern = m == 1 ? kGemv : kMma;
      float ms[2] = {};
      for (int twice = 0; twice < 2; ++twice) {
        CHECK(cudaEventRecord(e0));
        for (int rep = 0; rep < reps; ++rep)
          for (int i = 0; i < kCopies; ++i)
            for (int t = 0; t <= twice; ++t) run(kern, wt.layer[i], wt.shape, x, out, m);
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        CHECK(cudaEventElapsedTime(&ms[twice], e0, e1));
      }
      const double per = 1000.0 / (reps * kCopies);
      std::printf("l2 %-7s rows %2d %-4s cold %.1f us, warm (second of two) %.1f us\n", wt.shape.name, m,
                  kKernelNames[kern], ms[0] * per, (ms[1] - ms[0]) * per);
    }
  }

  CHECK(cudaGetLastError());
  std::printf("done\n");
  return 0;
}
