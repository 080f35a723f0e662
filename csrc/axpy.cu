// Placeholder device kernel proving the extension builds and runs end to end: y += alpha * x.
// Kernel-only translation unit: no torch headers, so it compiles in about a second.
#include <cuda_runtime.h>
#include <cstdint>

namespace {

__global__ void axpy_kernel(float* __restrict__ y, const float* __restrict__ x, float alpha, int64_t n) {
    int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (; i < n; i += stride) y[i] += alpha * x[i];
}

}  // namespace

// Launches on `stream`; returns the launch status so the caller can raise a readable error.
cudaError_t lora_da_axpy_launch(float* y, const float* x, float alpha, int64_t n, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    const int threads = 256;
    const int64_t wanted = (n + threads - 1) / threads;
    const int blocks = static_cast<int>(wanted < 65535 ? wanted : 65535);
    axpy_kernel<<<blocks, threads, 0, stream>>>(y, x, alpha, n);
    return cudaGetLastError();
}
