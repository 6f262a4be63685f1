// Decode attention's kernels: one new token per row, its query against the
// row's own cached keys 0..pos[r] (bot/engine/attention.py says where they
// are used and why; bot/engine/attention.cu launches them; no torch here, so
// that bench/attention_probe.cu builds them alone). Two kernels instead of
// three (q.k^T, softmax, p.v), split over the keys so that one row's step
// fills the GPU:
//
//   attn_split_kernel: grid (splits, kv heads, rows); each block takes `per`
//     consecutive keys of one row and kv head, its warps the G query heads
//     that read it (grouped-query attention) between them, a lane scoring
//     one key at a time against the warp's queries (float), then the running
//     softmax (max and sum per head, as flash attention keeps them) and p.v
//     with each lane holding 4 of the 128 dims. Writes the block's
//     unnormalized output and its (max, sum) per head.
//   attn_merge_kernel: per row and query head, the splits' outputs weighed
//     by exp(max_s - max) and divided by the total sum.
//
// Keys past pos[r] are never read; a block whose keys all lie past it writes
// nothing, and the merge reads only the splits that start at or before it.
//
// Launched as dependent launches (dependent_launch.cuh): a split block whose
// first round lies wholly before pos[r] (keys earlier steps wrote) fetches it
// before it waits for the kernel before it (which wrote key pos[r] and q).
#pragma once
#include <cuda_fp16.h>
#include <algorithm>
#include <cstdint>

#include "dependent_launch.cuh"

constexpr int kDim = 128;        // the head dim the kernels take
constexpr int kKeys = 32;        // keys a block scores at once: one per lane
constexpr int kMaxSplits = 128;  // splits per row and kv head at most (the merge's shared memory)
constexpr int kPad = 8;          // halves after each key's row in shared memory: lanes reading rows hit other banks

// Query heads a warp takes (of the G that share a kv head): a block's warps
// split them, so that one round's serial work a lane is G / warps heads.
template <int G>
__host__ __device__ constexpr int heads_per_warp() { return G >= 8 ? G / 4 : 1; }
template <int G>
__host__ __device__ constexpr int split_warps() { return G / heads_per_warp<G>(); }

__device__ __forceinline__ void copy_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}

// A block is one split: keys [begin, end) of one row and kv head. A round is
// latency-bound (a few hundred keys a row), so its keys' and values' tiles
// come into shared memory together (cp.async), then each warp scores the 32
// keys against its own heads, a lane a key.
template <int G>
__global__ void __launch_bounds__(split_warps<G>() * 32) attn_split_kernel(
    const half* __restrict__ q, const half* __restrict__ kc, const half* __restrict__ vc,
    const int64_t* __restrict__ pos, float* __restrict__ part_o, float2* __restrict__ part_ml, int n_kv,
    int max_len, int ctx, int per, int splits, float scale) {
  constexpr int GW = heads_per_warp<G>();
  constexpr int kThreads = split_warps<G>() * 32;
  __shared__ __align__(16) float qs[G][kDim];
  __shared__ __align__(16) half ks[kKeys][kDim + kPad];
  __shared__ __align__(16) half vs[kKeys][kDim];
  __shared__ float ps[G][kKeys];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int split = blockIdx.x, h = blockIdx.y, r = blockIdx.z;
  const int last = min(static_cast<int>(pos[r]), ctx - 1);  // a padded row's pos is past ctx
  const int begin = split * per;
  if (begin > last) return;  // the whole block: nothing to read
  const int end = min(begin + per, last + 1);
  const size_t head = (static_cast<size_t>(r) * n_kv + h) * max_len;
  const half* kh = kc + head * kDim;
  const half* vh = vc + head * kDim;
  auto fetch = [&](int k0, int n) {  // the round's tiles, 16 bytes a copy
    for (int i = threadIdx.x; i < n * (kDim / 8); i += kThreads) {
      const int j = i / (kDim / 8), c = 8 * (i % (kDim / 8));
      copy_async16(&ks[j][c], kh + static_cast<size_t>(k0 + j) * kDim + c);
      copy_async16(&vs[j][c], vh + static_cast<size_t>(k0 + j) * kDim + c);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  const int first = min(kKeys, end - begin);
  const bool early = begin + first <= pos[r];  // the first round holds no key this step writes
  if (early) fetch(begin, first);             // before anything waits
  wait_for_prior_kernels();                   // q and key pos[r] are the last kernel's
  dependents_may_launch();
  if (!early) fetch(begin, first);
  {  // q of the G heads that read kv head h, times the scale, in float: 16 bytes a thread
    const int4* qr = reinterpret_cast<const int4*>(q + (static_cast<size_t>(r) * n_kv + h) * G * kDim);
    for (int i = threadIdx.x; i < G * kDim / 8; i += kThreads) {
      const int4 raw = qr[i];
      const half2* q2 = reinterpret_cast<const half2*>(&raw);
      float* dst = &qs[0][0] + 8 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __half22float2(q2[j]);
        dst[2 * j] = f.x * scale;
        dst[2 * j + 1] = f.y * scale;
      }
    }
  }
  const int g0 = warp * GW;  // this warp's heads: g0 .. g0 + GW - 1
  float m[GW], l[GW], o[GW][4];
#pragma unroll
  for (int g = 0; g < GW; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) o[g][i] = 0.f;
  }
  for (int k0 = begin; k0 < end; k0 += kKeys) {
    const int n = min(kKeys, end - k0);
    if (k0 != begin) {  // a later round's tiles, once every warp is done with the last
      __syncthreads();
      fetch(k0, n);
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();  // the tiles (and, in the first round, q) in place
    float s[GW];
#pragma unroll
    for (int g = 0; g < GW; ++g) s[g] = lane < n ? 0.f : -INFINITY;
    if (lane < n) {
#pragma unroll
      for (int c = 0; c < kDim / 8; ++c) {
        const int4 raw = *reinterpret_cast<const int4*>(&ks[lane][8 * c]);
        const half2* k2 = reinterpret_cast<const half2*>(&raw);
        float kf[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = __half22float2(k2[j]);
          kf[2 * j] = f.x;
          kf[2 * j + 1] = f.y;
        }
#pragma unroll
        for (int g = 0; g < GW; ++g) {
          const float4 a = *reinterpret_cast<const float4*>(&qs[g0 + g][8 * c]);
          const float4 b = *reinterpret_cast<const float4*>(&qs[g0 + g][8 * c + 4]);
          s[g] = fmaf(a.x, kf[0], fmaf(a.y, kf[1], fmaf(a.z, kf[2], fmaf(a.w, kf[3], s[g]))));
          s[g] = fmaf(b.x, kf[4], fmaf(b.y, kf[5], fmaf(b.z, kf[6], fmaf(b.w, kf[7], s[g]))));
        }
      }
    }
    float mx[GW], sum[GW];
#pragma unroll
    for (int g = 0; g < GW; ++g) mx[g] = s[g];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)  // the heads' reductions side by side
#pragma unroll
      for (int g = 0; g < GW; ++g) mx[g] = fmaxf(mx[g], __shfl_xor_sync(0xffffffffu, mx[g], off));
#pragma unroll
    for (int g = 0; g < GW; ++g) {
      const float nm = fmaxf(m[g], mx[g]);  // finite: lane 0's key is below end
      sum[g] = __expf(s[g] - nm);           // 0 past end
      ps[g0 + g][lane] = sum[g];
      const float corr = __expf(m[g] - nm);  // 0 in the first round (m = -inf)
      m[g] = nm;
      l[g] *= corr;
#pragma unroll
      for (int i = 0; i < 4; ++i) o[g][i] *= corr;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int g = 0; g < GW; ++g) sum[g] += __shfl_xor_sync(0xffffffffu, sum[g], off);
#pragma unroll
    for (int g = 0; g < GW; ++g) l[g] += sum[g];
    __syncwarp();
#pragma unroll 8
    for (int j = 0; j < n; ++j) {  // p . v, a lane's 4 dims
      const uint2 raw = *reinterpret_cast<const uint2*>(&vs[j][4 * lane]);
      const half2* v2 = reinterpret_cast<const half2*>(&raw);
      const float2 a = __half22float2(v2[0]), b = __half22float2(v2[1]);
#pragma unroll
      for (int g = 0; g < GW; ++g) {
        const float p = ps[g0 + g][j];
        o[g][0] = fmaf(p, a.x, o[g][0]);
        o[g][1] = fmaf(p, a.y, o[g][1]);
        o[g][2] = fmaf(p, b.x, o[g][2]);
        o[g][3] = fmaf(p, b.y, o[g][3]);
      }
    }
  }
  const size_t at = ((static_cast<size_t>(r) * n_kv + h) * splits + split) * G + g0;
#pragma unroll
  for (int g = 0; g < GW; ++g)
    reinterpret_cast<float4*>(part_o + (at + g) * kDim)[lane] = make_float4(o[g][0], o[g][1], o[g][2], o[g][3]);
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GW; ++g) part_ml[at + g] = make_float2(m[g], l[g]);
  }
}

// One block a row and query head, a thread a dim: the splits' (max, sum)
// read once into shared memory, then every split's output read at once
// (independent loads) and weighed by exp(max_s - max).
template <int G>
__global__ void __launch_bounds__(kDim) attn_merge_kernel(
    const float* __restrict__ part_o, const float2* __restrict__ part_ml, const int64_t* __restrict__ pos,
    half* __restrict__ out, int n_kv, int ctx, int per, int splits) {
  __shared__ float2 ml[kMaxSplits];
  __shared__ float w[kMaxSplits];
  const int head = blockIdx.x, r = blockIdx.y, d = threadIdx.x;
  const int h = head / G, g = head % G;
  wait_for_prior_kernels();
  dependents_may_launch();
  const int last = min(static_cast<int>(pos[r]), ctx - 1);
  const int used = min(splits, last / per + 1);  // the splits that start at or before it
  const size_t base = (static_cast<size_t>(r) * n_kv + h) * splits;
  for (int s = d; s < used; s += kDim) ml[s] = part_ml[(base + s) * G + g];
  __syncthreads();
  float mx = -INFINITY;
  for (int s = 0; s < used; ++s) mx = fmaxf(mx, ml[s].x);
  for (int s = d; s < used; s += kDim) w[s] = __expf(ml[s].x - mx);
  __syncthreads();
  float acc = 0.f, sum = 0.f;
#pragma unroll 8
  for (int s = 0; s < used; ++s) {
    sum = fmaf(w[s], ml[s].y, sum);
    acc = fmaf(w[s], part_o[((base + s) * G + g) * kDim + d], acc);
  }
  out[(static_cast<size_t>(r) * n_kv * G + head) * kDim + d] = __float2half_rn(acc / sum);
}

// Blocks (splits) the split kernel aims at per SM (a row's step of a few
// hundred keys is too short to fill the GPU one block per kv head).
constexpr int kBlocksPerSm = 4;

struct AttnPlan {
  int per;     // keys a block takes: a multiple of kKeys
  int splits;  // blocks per row and kv head: splits * per >= ctx
};

// The split of ctx keys for rows x n_kv (row, kv head) pairs: about
// kBlocksPerSm blocks an SM, none with fewer than kKeys keys.
inline AttnPlan attn_plan(int rows, int n_kv, int ctx, int sms, int per = 0) {
  if (per <= 0) {
    const int pairs = rows * n_kv;
    const int want = (kBlocksPerSm * sms + pairs - 1) / pairs;
    const int splits = std::max(1, std::min(want, (ctx + kKeys - 1) / kKeys));
    per = ((ctx + splits - 1) / splits + kKeys - 1) / kKeys * kKeys;
  }
  const int fewest = ((ctx + kMaxSplits - 1) / kMaxSplits + kKeys - 1) / kKeys * kKeys;  // kMaxSplits at most
  per = std::max(per, fewest);
  return {per, (ctx + per - 1) / per};
}
