// Kernels of the statistics op (see kernels/reference.py for the contract). Kernel-only
// translation unit: no torch headers, so it compiles in seconds.
//
//   z_upper: Z[n, n] += X^T diag(M) X over the counted tokens, upper-triangular 64x64 tiles only.
//            Counted tokens are read through a device-side index list `order` whose length
//            `count` lives on the device (no host synchronisation). fp16/bf16 use tensor cores
//            (WMMA 16x16x16, fp32 accumulators); fp32 uses an fp32 FMA tile kernel.
//   y_update: y[m] += sum_t w_t g[t, m]^2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int kTile = 64;   // output tile of Z
constexpr int kChunk = 32;  // tokens per shared-memory stage
constexpr int kPad = 8;     // shared-memory row padding (bank conflicts; keeps WMMA alignment)

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

template <typename T>
__device__ __forceinline__ T zero() { return T(0.0f); }
template <>
__device__ __forceinline__ __half zero<__half>() { return __float2half(0.0f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero<__nv_bfloat16>() { return __float2bfloat16(0.0f); }

// Stage kChunk counted tokens' columns [c0, c0 + kTile) into s[kChunk][kTile + kPad] (zeros outside).
template <typename T>
__device__ __forceinline__ void stage(T (*s)[kTile + kPad], const T* __restrict__ x, int64_t stride_xt,
                                      const int32_t* __restrict__ order, int64_t t0, int64_t count, int64_t c0,
                                      int64_t n) {
    for (int e = threadIdx.x; e < kChunk * kTile; e += blockDim.x) {
        const int r = e / kTile, c = e % kTile;
        const int64_t t = t0 + r, col = c0 + c;
        T v = zero<T>();
        if (t < count && col < n) v = x[static_cast<int64_t>(order[t]) * stride_xt + col];
        s[r][c] = v;
    }
}

// Add the tile acc[kTile][kTile + 4] (shared, fp32) into Z at (r0, c0).
__device__ __forceinline__ void add_tile(float* __restrict__ z, int64_t ldz, int64_t n, int64_t r0, int64_t c0,
                                         const float (*acc)[kTile + 4]) {
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
        const int r = e / kTile, c = e % kTile;
        if (r0 + r < n && c0 + c < n) z[(r0 + r) * ldz + c0 + c] += acc[r][c];
    }
}

// Tensor-core path: 4 warps, each a 32x32 quarter of the 64x64 tile as 2x2 WMMA fragments.
template <typename T>
__global__ void __launch_bounds__(128) z_upper_wmma(const T* __restrict__ x, int64_t stride_xt,
                                                    const int32_t* __restrict__ order,
                                                    const int32_t* __restrict__ count_ptr, int64_t n,
                                                    float* __restrict__ z, int64_t ldz) {
    using namespace nvcuda;
    __shared__ __align__(32) T sa[kChunk][kTile + kPad];
    __shared__ __align__(32) T sb[kChunk][kTile + kPad];
    __shared__ __align__(32) float acc_tile[kTile][kTile + 4];
    const int64_t num_tiles = (n + kTile - 1) / kTile;
    int64_t ti, tj;
    tile_pair(blockIdx.x, num_tiles, ti, tj);
    const int64_t r0 = ti * kTile, c0 = tj * kTile;
    const int64_t count = *count_ptr;
    const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.0f);
    for (int64_t t0 = 0; t0 < count; t0 += kChunk) {
        stage(sa, x, stride_xt, order, t0, count, r0, n);
        stage(sb, x, stride_xt, order, t0, count, c0, n);
        __syncthreads();
        for (int k = 0; k < kChunk; k += 16) {
            // A[i][t] = X[t][r0 + i]: column-major view of sa; B[t][j] = X[t][c0 + j]: row-major sb
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
            for (int a = 0; a < 2; ++a) wmma::load_matrix_sync(fa[a], &sa[k][wr * 32 + a * 16], kTile + kPad);
            for (int b = 0; b < 2; ++b) wmma::load_matrix_sync(fb[b], &sb[k][wc * 32 + b * 16], kTile + kPad);
            for (int a = 0; a < 2; ++a)
                for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
        }
        __syncthreads();
    }
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
            wmma::store_matrix_sync(&acc_tile[wr * 32 + a * 16][wc * 32 + b * 16], acc[a][b], kTile + 4,
                                    wmma::mem_row_major);
    __syncthreads();
    add_tile(z, ldz, n, r0, c0, acc_tile);
}

// fp32 path: 256 threads, 4x4 outputs each, exact fp32 products (no TF32).
__global__ void __launch_bounds__(256) z_upper_fp32(const float* __restrict__ x, int64_t stride_xt,
                                                    const int32_t* __restrict__ order,
                                                    const int32_t* __restrict__ count_ptr, int64_t n,
                                                    float* __restrict__ z, int64_t ldz) {
    __shared__ float sa[kChunk][kTile + kPad];
    __shared__ float sb[kChunk][kTile + kPad];
    __shared__ float acc_tile[kTile][kTile + 4];
    const int64_t num_tiles = (n + kTile - 1) / kTile;
    int64_t ti, tj;
    tile_pair(blockIdx.x, num_tiles, ti, tj);
    const int64_t r0 = ti * kTile, c0 = tj * kTile;
    const int64_t count = *count_ptr;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float acc[4][4] = {};
    for (int64_t t0 = 0; t0 < count; t0 += kChunk) {
        stage(sa, x, stride_xt, order, t0, count, r0, n);
        stage(sb, x, stride_xt, order, t0, count, c0, n);
        __syncthreads();
        for (int k = 0; k < kChunk; ++k) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = sa[k][ty * 4 + i];
            for (int j = 0; j < 4; ++j) b[j] = sb[k][tx * 4 + j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc_tile[ty * 4 + i][tx * 4 + j] = acc[i][j];
    __syncthreads();
    add_tile(z, ldz, n, r0, c0, acc_tile);
}

// y[m] += sum_t w_t g[t, m]^2: threads along m (coalesced), token ranges split over blockIdx.y.
template <typename T>
__global__ void y_update(const T* __restrict__ g, int64_t stride_gt, const float* __restrict__ w, int64_t tokens,
                         int64_t m, int64_t tokens_per_block, float* __restrict__ y) {
    const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (col >= m) return;
    const int64_t begin = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
    const int64_t end = begin + tokens_per_block < tokens ? begin + tokens_per_block : tokens;
    float sum = 0.0f;
    for (int64_t t = begin; t < end; ++t) {
        const float v = to_float(g[t * stride_gt + col]);
        sum = fmaf(w[t] * v, v, sum);
    }
    atomicAdd(&y[col], sum);
}

}  // namespace

// dtype codes: 0 = fp32, 1 = fp16, 2 = bf16.
cudaError_t lora_da_z_upper_launch(const void* x, int dtype, int64_t stride_xt, const int32_t* order,
                                   const int32_t* count, int64_t n, float* z, int64_t ldz, cudaStream_t stream) {
    const int64_t tiles = (n + kTile - 1) / kTile;
    const int64_t blocks = tiles * (tiles + 1) / 2;
    if (blocks == 0) return cudaSuccess;
    switch (dtype) {
        case 0:
            z_upper_fp32<<<blocks, 256, 0, stream>>>(static_cast<const float*>(x), stride_xt, order, count, n, z, ldz);
            break;
        case 1:
            z_upper_wmma<__half><<<blocks, 128, 0, stream>>>(static_cast<const __half*>(x), stride_xt, order, count,
                                                             n, z, ldz);
            break;
        case 2:
            z_upper_wmma<__nv_bfloat16><<<blocks, 128, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), stride_xt,
                                                                    order, count, n, z, ldz);
            break;
        default:
            return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

cudaError_t lora_da_y_update_launch(const void* g, int dtype, int64_t stride_gt, const float* w, int64_t tokens,
                                    int64_t m, float* y, cudaStream_t stream) {
    if (tokens == 0 || m == 0) return cudaSuccess;
    const int threads = 256;
    const int64_t per_block = 256;
    const dim3 grid(static_cast<unsigned>((m + threads - 1) / threads),
                    static_cast<unsigned>((tokens + per_block - 1) / per_block));
    switch (dtype) {
        case 0:
            y_update<float><<<grid, threads, 0, stream>>>(static_cast<const float*>(g), stride_gt, w, tokens, m,
                                                          per_block, y);
            break;
        case 1:
            y_update<__half><<<grid, threads, 0, stream>>>(static_cast<const __half*>(g), stride_gt, w, tokens, m,
                                                           per_block, y);
            break;
        case 2:
            y_update<__nv_bfloat16><<<grid, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(g), stride_gt, w,
                                                                  tokens, m, per_block, y);
            break;
        default:
            return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}
