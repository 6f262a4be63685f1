// The decode attention kernels alone, without torch (nvcc builds this in
// seconds; bench/gpu-call.sh attn-probe builds and runs it):
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o attn bench/attention_probe.cu
//   ./attn [reps]
//
// Llama-2-70B's attention shape (64 query heads, 8 kv heads, head dim 128).
// For rows x context buckets it checks the kernels against a double-precision
// softmax(q.k^T / sqrt(128)).v on the CPU, each row at its own position
// (0, a split's edges, the bucket's last, random; the last row padded: its
// position past the bucket, as the engine's padded rows are), and times 80
// layers' calls captured in one CUDA graph (each layer its own caches, so
// that L2 does not hold them between uses) for the planned split and for
// fixed keys a block, with the bytes of keys and values the rows read.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../bot/engine/attention_kernels.cuh"
#include "cuda_check.h"

namespace {

constexpr int kHeads = 64, kKv = 8, kG = kHeads / kKv, kLayers = 80;

struct Bufs {
  half *q, *k, *v, *out;
  int64_t* pos;
  float *part_o, *part_ml;
};

void launch(const Bufs& b, size_t layer_elems, int layer, int rows, int max_len, int ctx, const AttnPlan& pl,
            float scale, cudaStream_t st) {
  const dim3 grid(pl.splits, kKv, rows);
  const half* k = b.k + layer_elems * layer;
  const half* v = b.v + layer_elems * layer;
  attn_split_kernel<kG><<<grid, split_warps<kG>() * 32, 0, st>>>(b.q, k, v, b.pos, b.part_o,
                                                           reinterpret_cast<float2*>(b.part_ml), kKv, max_len, ctx,
                                                           pl.per, pl.splits, scale);
  attn_merge_kernel<kG><<<dim3(kHeads, rows), kDim, 0, st>>>(b.part_o, reinterpret_cast<const float2*>(b.part_ml),
                                                             b.pos, b.out, kKv, ctx, pl.per, pl.splits);
}

float h2f(half h) { return __half2float(h); }

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 20;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("%s, %d SMs\n", prop.name, sms);
  const float scale = 1.f / std::sqrt(static_cast<float>(kDim));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  bool all_ok = true;
  const int row_counts[] = {1, 2, 8, 32};
  const int contexts[] = {256, 512, 1280, 4096};
  for (int rows : row_counts) {
    for (int ctx : contexts) {
      const int max_len = ctx + 1;  // the engine's scratch position is past every bucket it reads
      const size_t layer_elems = static_cast<size_t>(rows) * kKv * max_len * kDim;
      // layers of caches, at least 1 GB in all, so that L2 (50 MB) holds none between uses
      const int copies = static_cast<int>(std::min<size_t>(kLayers, (size_t{1} << 30) / (layer_elems * 4) + 1));
      std::vector<half> hk(layer_elems), hv(layer_elems), hq(static_cast<size_t>(rows) * kHeads * kDim);
      for (auto& x : hk) x = __float2half(normal(rng));
      for (auto& x : hv) x = __float2half(normal(rng));
      for (auto& x : hq) x = __float2half(2.f * normal(rng));  // peaked softmaxes as well as flat ones
      std::vector<int64_t> hpos(rows);
      const AttnPlan plan = attn_plan(rows, kKv, ctx, sms);
      const int edges[] = {0, plan.per - 1, plan.per, ctx - 1, ctx / 2};
      for (int r = 0; r < rows; ++r)
        hpos[r] = r < 5 ? std::min(edges[r], ctx - 1) : static_cast<int64_t>(rng() % ctx);
      if (rows > 1) hpos[rows - 1] = max_len - 1;  // padded: reads the whole bucket
      Bufs b;
      CHECK(cudaMalloc(&b.q, hq.size() * sizeof(half)));
      CHECK(cudaMalloc(&b.k, layer_elems * copies * sizeof(half)));
      CHECK(cudaMalloc(&b.v, layer_elems * copies * sizeof(half)));
      CHECK(cudaMalloc(&b.out, hq.size() * sizeof(half)));
      CHECK(cudaMalloc(&b.pos, rows * sizeof(int64_t)));
      const int most_splits = kMaxSplits;
      CHECK(cudaMalloc(&b.part_o, static_cast<size_t>(rows) * kHeads * most_splits * kDim * sizeof(float)));
      CHECK(cudaMalloc(&b.part_ml, static_cast<size_t>(rows) * kHeads * most_splits * 2 * sizeof(float)));
      for (int c = 0; c < copies; ++c) {
        CHECK(cudaMemcpy(b.k + layer_elems * c, hk.data(), layer_elems * sizeof(half), cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(b.v + layer_elems * c, hv.data(), layer_elems * sizeof(half), cudaMemcpyHostToDevice));
      }
      CHECK(cudaMemcpy(b.q, hq.data(), hq.size() * sizeof(half), cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy(b.pos, hpos.data(), rows * sizeof(int64_t), cudaMemcpyHostToDevice));

      // the check, against double precision on the CPU (every row, head and dim)
      std::vector<double> want(hq.size());
      double peak = 0.0;
      for (int r = 0; r < rows; ++r) {
        const int last = static_cast<int>(std::min<int64_t>(hpos[r], ctx - 1));
        for (int hq_i = 0; hq_i < kHeads; ++hq_i) {
          const size_t base = (static_cast<size_t>(r) * kKv + hq_i / kG) * max_len;
          const size_t at = (static_cast<size_t>(r) * kHeads + hq_i) * kDim;
          std::vector<double> s(last + 1);
          double mx = -1e300;
          for (int j = 0; j <= last; ++j) {
            double d = 0.0;
            for (int e = 0; e < kDim; ++e) d += static_cast<double>(h2f(hq[at + e])) * h2f(hk[(base + j) * kDim + e]);
            s[j] = d * scale;
            mx = std::max(mx, s[j]);
          }
          double sum = 0.0;
          for (auto& x : s) sum += (x = std::exp(x - mx));
          for (int e = 0; e < kDim; ++e) {
            double o = 0.0;
            for (int j = 0; j <= last; ++j) o += s[j] * h2f(hv[(base + j) * kDim + e]);
            want[at + e] = o / sum;
            peak = std::max(peak, std::fabs(want[at + e]));
          }
        }
      }
      const int pers[] = {0, 32, 64, 128, 256};
      double worst = 0.0;
      for (int per : pers) {
        const AttnPlan pl = attn_plan(rows, kKv, ctx, sms, per);
        CHECK(cudaMemset(b.out, 0xff, hq.size() * sizeof(half)));  // NaN: nothing left from the last variant
        launch(b, layer_elems, 0, rows, max_len, ctx, pl, scale, nullptr);
        CHECK(cudaGetLastError());
        std::vector<half> got(hq.size());
        CHECK(cudaMemcpy(got.data(), b.out, got.size() * sizeof(half), cudaMemcpyDeviceToHost));
        double err = 0.0;
        for (size_t i = 0; i < got.size(); ++i) {
          const double e = std::fabs(h2f(got[i]) - want[i]);
          err = std::isnan(e) ? 1e300 : std::max(err, e);
        }
        const double rel = err / peak;
        worst = std::max(worst, rel);
        if (!(rel < 2e-3)) {
          all_ok = false;
          std::printf("rows %2d ctx %4d per %3d: WRONG, max error %.3g of the largest output\n", rows, ctx, pl.per,
                      rel);
        }
      }

      // the time: 80 layers' calls in one graph, each layer its own caches, every
      // row reading the whole bucket (as a step near the bucket's end does)
      for (auto& p : hpos) p = ctx - 1;
      CHECK(cudaMemcpy(b.pos, hpos.data(), rows * sizeof(int64_t), cudaMemcpyHostToDevice));
      cudaStream_t st;
      CHECK(cudaStreamCreate(&st));
      std::printf("rows %2d ctx %4d (max error %.2g):", rows, ctx, worst);
      for (int per : pers) {
        const AttnPlan pl = attn_plan(rows, kKv, ctx, sms, per);
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
        for (int layer = 0; layer < kLayers; ++layer)
          launch(b, layer_elems, layer % copies, rows, max_len, ctx, pl, scale, st);
        CHECK(cudaStreamEndCapture(st, &graph));
        CHECK(cudaGraphInstantiate(&exec, graph, 0));
        CHECK(cudaGraphLaunch(exec, st));  // warm
        cudaEvent_t t0, t1;
        CHECK(cudaEventCreate(&t0));
        CHECK(cudaEventCreate(&t1));
        CHECK(cudaEventRecord(t0, st));
        for (int i = 0; i < reps; ++i) CHECK(cudaGraphLaunch(exec, st));
        CHECK(cudaEventRecord(t1, st));
        CHECK(cudaEventSynchronize(t1));
        float ms = 0.f;
        CHECK(cudaEventElapsedTime(&ms, t0, t1));
        const double us_layer = 1e3 * ms / reps / kLayers;
        double bytes = 0.0;  // keys and values the rows read
        for (int r = 0; r < rows; ++r) bytes += 2.0 * kKv * (std::min<int64_t>(hpos[r], ctx - 1) + 1) * kDim * 2;
        std::printf("  %s%d: %.2f us/layer (%.0f GB/s, %d splits)", per ? "per " : "plan per ", pl.per, us_layer,
                    bytes / (us_layer * 1e3), pl.splits);
        CHECK(cudaGraphExecDestroy(exec));
        CHECK(cudaGraphDestroy(graph));
      }
      std::printf("\n");
      CHECK(cudaStreamDestroy(st));
      for (void* p : {static_cast<void*>(b.q), static_cast<void*>(b.k), static_cast<void*>(b.v),
                      static_cast<void*>(b.out), static_cast<void*>(b.pos), static_cast<void*>(b.part_o),
                      static_cast<void*>(b.part_ml)})
        CHECK(cudaFree(p));
    }
  }
  std::printf(all_ok ? "all checks within 2e-3 of the largest output\n" : "SOME CHECKS FAILED\n");
  return all_ok ? 0 : 1;
}
