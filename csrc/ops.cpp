// torch.library registration of the lora_da::* ops (CUDA implementations, meta kernels).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <limits>
#include <map>
#include <optional>
#include <utility>
#include <vector>

cudaError_t lora_da_block_pointers_launch(const void* x, int64_t element_size, float* z, int64_t ldz, int64_t block,
                                          int64_t full, int kind, int64_t count, const void** a, const void** b,
                                          void** c, cudaStream_t stream);
int64_t lora_da_y_slices(int64_t tokens);
cudaError_t lora_da_y_update_launch(const void* g, int dtype, int64_t stride_gt, const float* w, int64_t tokens,
                                    int64_t m, float* partial, float* y, cudaStream_t stream);

namespace {

int dtype_code(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return 0;
        case at::kHalf: return 1;
        case at::kBFloat16: return 2;
        default: TORCH_CHECK(false, "lora_da::fisher_update_ takes float32, float16 or bfloat16 inputs, not ", t);
    }
}

cudaDataType_t cuda_type(at::ScalarType t) {
    return t == at::kFloat ? CUDA_R_32F : t == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
}

void check_fisher_args(const at::Tensor& x, const at::Tensor& mask, at::TensorList grads,
                       const std::optional<at::Tensor>& z, at::TensorList gs, at::TensorList ys,
                       std::optional<int64_t> counted) {
    TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "lora_da::fisher_update_: x must be [T, n] with unit column stride");
    const int64_t tokens = x.size(0), n = x.size(1);
    dtype_code(x.scalar_type());
    TORCH_CHECK(mask.dim() == 1 && mask.size(0) == tokens, "lora_da::fisher_update_: mask must be [T]");
    TORCH_CHECK(!counted.has_value() || (*counted >= 0 && *counted <= tokens),
                "lora_da::fisher_update_: counted must be in [0, T]");
    TORCH_CHECK(grads.size() == gs.size() && grads.size() == ys.size(),
                "lora_da::fisher_update_: one gradient, G and y per module");
    if (z.has_value()) {
        TORCH_CHECK(z->scalar_type() == at::kFloat && z->dim() == 2 && z->size(0) == n && z->size(1) == n &&
                        z->stride(1) == 1, "lora_da::fisher_update_: Z must be fp32 [n, n] with unit column stride");
    }
    for (size_t k = 0; k < grads.size(); ++k) {
        const int64_t m = grads[k].size(-1);
        TORCH_CHECK(grads[k].dim() == 2 && grads[k].size(0) == tokens && grads[k].stride(1) == 1 &&
                        grads[k].scalar_type() == x.scalar_type(),
                    "lora_da::fisher_update_: gradient ", k, " must be [T, m] like x with unit column stride");
        TORCH_CHECK(gs[k].scalar_type() == at::kFloat && gs[k].is_contiguous() && gs[k].size(0) == m &&
                        gs[k].size(1) == n, "lora_da::fisher_update_: G ", k, " must be contiguous fp32 [m, n]");
        TORCH_CHECK(ys[k].scalar_type() == at::kFloat && ys[k].is_contiguous() && ys[k].numel() == m,
                    "lora_da::fisher_update_: y ", k, " must be contiguous fp32 [m]");
    }
    TORCH_CHECK(tokens < std::numeric_limits<int>::max() && n < std::numeric_limits<int>::max(),
                "lora_da::fisher_update_: sizes beyond int32");
}

constexpr int64_t kZBlock = 256;  // rows and columns of the blocks of Z, one batched GEMM per block shape

void check_cublas(cublasStatus_t status, const char* what) {
    TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "lora_da::fisher_update_: ", what, " failed (cuBLAS status ", status, ")");
}

void check_cuda(cudaError_t status, const char* what) {
    TORCH_CHECK(status == cudaSuccess, "lora_da::fisher_update_: ", what, " failed: ", cudaGetErrorString(status));
}

// The upper-triangular kZBlock x kZBlock blocks of z [n, n] (fp32, row-major) += xm^T xm for the
// masked inputs xm [T, n] (unit column stride): one batched GEMM per block shape (full blocks; full rows
// against the last, partial column; the last block), pointers laid out on the device. The
// diagonal blocks are updated whole. About (n / kZBlock + 1) / (2 n / kZBlock) of X^T X's flops.
void add_upper_gram(const at::Tensor& xm, at::Tensor& z, cublasHandle_t handle, cublasComputeType_t compute,
                    cudaStream_t stream) {
    const int64_t tokens = xm.size(0), n = xm.size(1);
    const int64_t full = n / kZBlock, rest = n % kZBlock;
    struct Shape { int kind; int64_t count, rows, cols; };
    std::vector<Shape> shapes = {{0, full * (full + 1) / 2, kZBlock, kZBlock}};
    if (rest > 0) {
        shapes.push_back({1, full, kZBlock, rest});
        shapes.push_back({2, 1, rest, rest});
    }
    int64_t total = 0;
    for (const Shape& shape : shapes) total += shape.count;
    const at::Tensor pointers = at::empty({3 * total}, xm.options().dtype(at::kLong));
    const void** base = reinterpret_cast<const void**>(pointers.data_ptr<int64_t>());
    const cudaDataType_t type = cuda_type(xm.scalar_type());
    const float one = 1.0f;
    int64_t offset = 0;
    for (const Shape& shape : shapes) {
        if (shape.count == 0) continue;
        const void** a = base + offset;
        const void** b = base + total + offset;
        void** c = const_cast<void**>(base + 2 * total + offset);
        check_cuda(lora_da_block_pointers_launch(xm.data_ptr(), xm.element_size(), z.data_ptr<float>(), z.stride(0),
                                                 kZBlock, full, shape.kind, shape.count, a, b, c, stream),
                   "the block pointers kernel");
        check_cublas(cublasGemmBatchedEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(shape.cols),
                                         static_cast<int>(shape.rows), static_cast<int>(tokens), &one, a, type,
                                         static_cast<int>(xm.stride(0)), b, type, static_cast<int>(xm.stride(0)), &one,
                                         c, CUDA_R_32F, static_cast<int>(z.stride(0)), static_cast<int>(shape.count),
                                         compute, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmBatchedEx (Z)");
        offset += shape.count;
    }
}

// G_k [m_k, n] += grads[k]^T x for every module: one batched GEMM per (m, row stride) shared by
// several modules (Q, K and V; gate and up), cublasGemmEx for the others. Row-major G [m, n] is
// column-major C [n, m] = x-view [n, T] * (grads-view [m, T])^T.
void add_gradients(const at::Tensor& x, at::TensorList grads, at::TensorList gs, cublasHandle_t handle,
                   cublasComputeType_t compute) {
    const int64_t tokens = x.size(0), n = x.size(1);
    const cudaDataType_t type = cuda_type(x.scalar_type());
    const float one = 1.0f;
    std::map<std::pair<int64_t, int64_t>, std::vector<size_t>> groups;
    for (size_t k = 0; k < grads.size(); ++k) {
        if (grads[k].size(1) > 0) groups[{grads[k].size(1), grads[k].stride(0)}].push_back(k);
    }
    for (const auto& [shape, members] : groups) {
        const auto [m, stride] = shape;
        if (members.size() == 1) {
            check_cublas(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(n), static_cast<int>(m),
                                      static_cast<int>(tokens), &one, x.data_ptr(), type, static_cast<int>(x.stride(0)),
                                      grads[members[0]].data_ptr(), type, static_cast<int>(stride), &one,
                                      gs[members[0]].data_ptr(), CUDA_R_32F, static_cast<int>(n), compute,
                                      CUBLAS_GEMM_DEFAULT),
                         "cublasGemmEx (G)");
            continue;
        }
        const int64_t count = static_cast<int64_t>(members.size());
        at::Tensor host = at::empty({3 * count}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
        int64_t* slots = host.data_ptr<int64_t>();
        for (int64_t i = 0; i < count; ++i) {
            slots[i] = reinterpret_cast<int64_t>(x.data_ptr());
            slots[count + i] = reinterpret_cast<int64_t>(grads[members[i]].data_ptr());
            slots[2 * count + i] = reinterpret_cast<int64_t>(gs[members[i]].data_ptr());
        }
        const at::Tensor pointers = host.to(x.device(), /*non_blocking=*/true);
        const void** base = reinterpret_cast<const void**>(pointers.data_ptr<int64_t>());
        check_cublas(cublasGemmBatchedEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(n), static_cast<int>(m),
                                         static_cast<int>(tokens), &one, base, type, static_cast<int>(x.stride(0)),
                                         base + count, type, static_cast<int>(stride), &one,
                                         const_cast<void**>(base + 2 * count), CUDA_R_32F, static_cast<int>(n),
                                         static_cast<int>(count), compute, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmBatchedEx (G)");
    }
}

// Z (upper triangle) += X^T diag(M) X; G_k += Gout_k^T X; y_k += sum_t M_t Gout_k[t]^2 (cuBLAS
// GEMMs with beta = 1 into the fp32 accumulators; y in a fixed order, without atomics).
// x [T, n], mask [T], grads[k] [T, m_k] in fp32/fp16/bf16 (fp32: exact products, no TF32).
void fisher_update_cuda(const at::Tensor& x, const at::Tensor& mask, at::TensorList grads,
                        const std::optional<at::Tensor>& z, at::TensorList gs, at::TensorList ys,
                        std::optional<int64_t> counted) {
    check_fisher_args(x, mask, grads, z, gs, ys, counted);
    TORCH_CHECK(x.is_cuda(), "lora_da::fisher_update_ needs CUDA tensors");
    // the stream, the cuBLAS handle and the launches belong to x's device, not the current one
    const c10::cuda::CUDAGuard device_guard(x.device());
    const int64_t tokens = x.size(0), n = x.size(1);
    if (tokens == 0 || n == 0) return;
    const int code = dtype_code(x.scalar_type());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
    check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
    const cublasComputeType_t compute = code == 0 ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
    const at::Tensor weights = mask.to(at::kFloat).contiguous();
    if (z.has_value() && counted.value_or(tokens) > 0) {
        // compacted: the first `counted` rows; else masked tokens become zero rows (0/1 weights:
        // exact in every dtype), with no host synchronisation
        const at::Tensor xm = counted.has_value() ? x.narrow(0, 0, *counted)
                                                  : x * weights.to(x.scalar_type()).unsqueeze(1);
        at::Tensor z_out = *z;
        add_upper_gram(xm, z_out, handle, compute, stream);
    }
    add_gradients(x, grads, gs, handle, compute);
    int64_t widest = 0;
    for (const at::Tensor& g : grads) widest = std::max(widest, g.size(1));
    const at::Tensor partial = at::empty({lora_da_y_slices(tokens) * widest}, weights.options());
    for (size_t k = 0; k < grads.size(); ++k) {
        check_cuda(lora_da_y_update_launch(grads[k].data_ptr(), code, grads[k].stride(0), weights.data_ptr<float>(),
                                           tokens, grads[k].size(1), partial.data_ptr<float>(), ys[k].data_ptr<float>(),
                                           stream),
                   "the y kernel");
    }
}

void fisher_update_meta(const at::Tensor& x, const at::Tensor& mask, at::TensorList grads,
                        const std::optional<at::Tensor>& z, at::TensorList gs, at::TensorList ys,
                        std::optional<int64_t> counted) {
    check_fisher_args(x, mask, grads, z, gs, ys, counted);
}

}  // namespace

TORCH_LIBRARY(lora_da, m) {
    m.def("fisher_update_(Tensor x, Tensor mask, Tensor[] grads, Tensor(a!)? z, Tensor(b!)[] gs, Tensor(c!)[] ys, "
          "int? counted=None) -> ()");
}

TORCH_LIBRARY_IMPL(lora_da, CUDA, m) {
    m.impl("fisher_update_", &fisher_update_cuda);
}

TORCH_LIBRARY_IMPL(lora_da, Meta, m) {
    m.impl("fisher_update_", &fisher_update_meta);
}

// The shared object is loaded with torch.ops.load_library; this keeps it importable as a module too.
extern "C" {
#include <Python.h>
PyMODINIT_FUNC PyInit__C(void) {
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
    return PyModule_Create(&module);
}
}
