// Programmatic dependent launch (Hopper and later; bot/engine/cuda_ext.py
// says why and where it is turned on). A kernel launched with
// launch_dependent(true, ...) may start while the kernel before it in the
// stream still runs, from the moment every block of that one has called
// dependents_may_launch() (or exited). Before it reads anything the earlier
// kernel writes, and before it writes anything at all (its output may be
// memory the earlier kernel still reads), it calls wait_for_prior_kernels():
// what comes before that call may read only what no kernel of the step
// writes (weights, the cache's older positions). Launched the plain way, or
// on a GPU before Hopper, both calls are no-ops and the kernel runs as it
// always did. No torch here: the probes (bench/*_probe.cu) build it alone.
#pragma once
#include <cuda_runtime.h>

__device__ __forceinline__ void wait_for_prior_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void dependents_may_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether this extension's launches are dependent ones: each extension (one
// shared library) has its own, set from Python (cuda_ext.set_dependent_launch,
// which checks the GPU is a Hopper or later) through the module's
// set_dependent_launch.
inline bool& dependent_launch_on() {
  static bool on = false;
  return on;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent
// launch where `dependent`.
template <typename... Params, typename... Args>
cudaError_t launch_dependent(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}
