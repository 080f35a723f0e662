// Kernels of the statistics op (see lora_da/kernels/reference.py for the contract). Kernel-only
// translation unit: no torch headers, so it compiles in seconds. The products themselves are
// cuBLAS GEMMs (csrc/ops.cpp); these kernels lay out their batches and sum y.
//
//   block_pointers: the A, B and C pointers of the batched GEMMs over the upper-triangular
//                   blocks of Z, written on the device (no host synchronisation).
//   y_partial, y_reduce: y[m] += sum_t w_t g[t, m]^2 in a fixed order (token slices summed
//                   into a [slices, m] scratch, then the slices in order): no float atomics,
//                   the same bits run after run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace {

// (i, j), i <= j, of the pid-th tile of the upper triangle of a num_tiles x num_tiles grid.
__device__ __forceinline__ void tile_pair(int64_t pid, int64_t num_tiles, int64_t& i, int64_t& j) {
    const double b = 2.0 * num_tiles + 1.0;
    i = static_cast<int64_t>((b - sqrt(b * b - 8.0 * static_cast<double>(pid))) / 2.0);
    auto start = [num_tiles](int64_t r) { return r * num_tiles - r * (r - 1) / 2; };
    if (pid < start(i)) --i;
    if (pid >= start(i) + num_tiles - i) ++i;
    j = i + (pid - start(i));
}

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Pointers of the upper-triangular blocks (i, j), i <= j, of Z [n, n] (row-major, ld ldz) in
// one block shape; x [T, n] row-major (``element_size`` bytes each), the masked inputs. ``kind``
// 0: the full blocks, i <= j < full; 1: the full rows i < full against the last, partial block
// column j = full; 2: the last block (full, full). Block (i, j) += X[:, I]^T X[:, J], which
// cuBLAS sees in column-major as C [|J|, |I|] = A [|J|, T] B^T with A = x + j * block and
// B = x + i * block (both ld n) and C = z + i * block * ldz + j * block.
__global__ void block_pointers(const char* x, int64_t element_size, float* z, int64_t ldz, int64_t block,
                               int64_t full, int kind, int64_t count, const void** a, const void** b, void** c) {
    const int64_t pid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (pid >= count) return;
    int64_t i = full, j = full;
    if (kind == 0) tile_pair(pid, full, i, j);
    if (kind == 1) i = pid;
    a[pid] = x + j * block * element_size;
    b[pid] = x + i * block * element_size;
    c[pid] = z + i * block * ldz + j * block;
}

// y partial sums: partial[s, col] = sum over token slice s of w_t g[t, col]^2, threads along
// m (coalesced), one slice per blockIdx.y, tokens in order.
template <typename T>
__global__ void y_partial(const T* __restrict__ g, int64_t stride_gt, const float* __restrict__ w, int64_t tokens,
                          int64_t m, int64_t tokens_per_slice, float* __restrict__ partial) {
    const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (col >= m) return;
    const int64_t begin = static_cast<int64_t>(blockIdx.y) * tokens_per_slice;
    const int64_t end = begin + tokens_per_slice < tokens ? begin + tokens_per_slice : tokens;
    float sum = 0.0f;
    for (int64_t t = begin; t < end; ++t) {
        const float v = to_float(g[t * stride_gt + col]);
        sum = fmaf(w[t] * v, v, sum);
    }
    partial[static_cast<int64_t>(blockIdx.y) * m + col] = sum;
}

// y[col] += the slices' partial sums, in slice order.
__global__ void y_reduce(const float* __restrict__ partial, int64_t slices, int64_t m, float* __restrict__ y) {
    const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (col >= m) return;
    float sum = 0.0f;
    for (int64_t s = 0; s < slices; ++s) sum += partial[s * m + col];
    y[col] += sum;
}

}  // namespace

cudaError_t lora_da_block_pointers_launch(const void* x, int64_t element_size, float* z, int64_t ldz, int64_t block,
                                          int64_t full, int kind, int64_t count, const void** a, const void** b,
                                          void** c, cudaStream_t stream) {
    if (count == 0) return cudaSuccess;
    const int threads = 128;
    block_pointers<<<static_cast<unsigned>((count + threads - 1) / threads), threads, 0, stream>>>(
        static_cast<const char*>(x), element_size, z, ldz, block, full, kind, count, a, b, c);
    return cudaGetLastError();
}

// dtype codes: 0 = fp32, 1 = fp16, 2 = bf16.
int64_t lora_da_y_slices(int64_t tokens) {
    constexpr int64_t kTokensPerSlice = 256, kMaxSlices = 64;
    const int64_t slices = (tokens + kTokensPerSlice - 1) / kTokensPerSlice;
    return slices < kMaxSlices ? slices : kMaxSlices;
}

cudaError_t lora_da_y_update_launch(const void* g, int dtype, int64_t stride_gt, const float* w, int64_t tokens,
                                    int64_t m, float* partial, float* y, cudaStream_t stream) {
    if (tokens == 0 || m == 0) return cudaSuccess;
    const int threads = 256;
    const int64_t slices = lora_da_y_slices(tokens);
    const int64_t per_slice = (tokens + slices - 1) / slices;
    const dim3 grid(static_cast<unsigned>((m + threads - 1) / threads), static_cast<unsigned>(slices));
    switch (dtype) {
        case 0:
            y_partial<float><<<grid, threads, 0, stream>>>(static_cast<const float*>(g), stride_gt, w, tokens, m,
                                                           per_slice, partial);
            break;
        case 1:
            y_partial<__half><<<grid, threads, 0, stream>>>(static_cast<const __half*>(g), stride_gt, w, tokens, m,
                                                            per_slice, partial);
            break;
        case 2:
            y_partial<__nv_bfloat16><<<grid, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(g), stride_gt, w,
                                                                   tokens, m, per_slice, partial);
            break;
        default:
            return cudaErrorInvalidValue;
    }
    y_reduce<<<static_cast<unsigned>((m + threads - 1) / threads), threads, 0, stream>>>(partial, slices, m, y);
    return cudaGetLastError();
}
