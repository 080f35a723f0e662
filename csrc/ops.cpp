// torch.library registration of the lora_da::* ops (CUDA implementations, meta kernels).
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <limits>
#include <optional>

cudaError_t lora_da_z_upper_launch(const void* x, int dtype, int64_t stride_xt, const int32_t* order,
                                   const int32_t* count, int64_t n, float* z, int64_t ldz, cudaStream_t stream);
cudaError_t lora_da_y_update_launch(const void* g, int dtype, int64_t stride_gt, const float* w, int64_t tokens,
                                    int64_t m, float* y, cudaStream_t stream);

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
                       const std::optional<at::Tensor>& z, at::TensorList gs, at::TensorList ys) {
    TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "lora_da::fisher_update_: x must be [T, n] with unit column stride");
    const int64_t tokens = x.size(0), n = x.size(1);
    dtype_code(x.scalar_type());
    TORCH_CHECK(mask.dim() == 1 && mask.size(0) == tokens, "lora_da::fisher_update_: mask must be [T]");
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

// Z (upper triangle) += X^T diag(M) X; G_k += Gout_k^T X (cuBLAS, beta = 1); y_k += sum_t M_t Gout_k[t]^2.
// x [T, n], mask [T], grads[k] [T, m_k] in fp32/fp16/bf16; accumulators fp32.
void fisher_update_cuda(const at::Tensor& x, const at::Tensor& mask, at::TensorList grads,
                        const std::optional<at::Tensor>& z, at::TensorList gs, at::TensorList ys) {
    check_fisher_args(x, mask, grads, z, gs, ys);
    TORCH_CHECK(x.is_cuda(), "lora_da::fisher_update_ needs CUDA tensors");
    const int64_t tokens = x.size(0), n = x.size(1);
    if (tokens == 0) return;
    const int code = dtype_code(x.scalar_type());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
    const at::Tensor counted = mask.to(at::kBool);
    const at::Tensor weights = mask.to(at::kFloat).contiguous();
    if (z.has_value()) {
        // counted tokens first, built on the device: no host synchronisation
        const at::Tensor order = at::argsort(counted.logical_not().to(at::kByte), /*stable=*/true, 0, false)
                                     .to(at::kInt);
        const at::Tensor count = counted.sum(at::kInt).reshape({1});
        const cudaError_t status = lora_da_z_upper_launch(x.data_ptr(), code, x.stride(0), order.data_ptr<int32_t>(),
                                                          count.data_ptr<int32_t>(), n, z->data_ptr<float>(),
                                                          z->stride(0), stream);
        TORCH_CHECK(status == cudaSuccess, "lora_da::fisher_update_: Z kernel failed: ", cudaGetErrorString(status));
    }
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
    TORCH_CHECK(cublasSetStream(handle, stream) == CUBLAS_STATUS_SUCCESS, "cublasSetStream failed");
    const cublasComputeType_t compute = code == 0 ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
    const float one = 1.0f;
    for (size_t k = 0; k < grads.size(); ++k) {
        const int64_t m = grads[k].size(1);
        if (m == 0 || n == 0) continue;
        // row-major G [m, n] is column-major C [n, m] = X^T-view [n, T] * (Gout-view [m, T])^T
        const cublasStatus_t status = cublasGemmEx(
            handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(n), static_cast<int>(m), static_cast<int>(tokens),
            &one, x.data_ptr(), cuda_type(x.scalar_type()), static_cast<int>(x.stride(0)), grads[k].data_ptr(),
            cuda_type(x.scalar_type()), static_cast<int>(grads[k].stride(0)), &one, gs[k].data_ptr(), CUDA_R_32F,
            static_cast<int>(n), compute, CUBLAS_GEMM_DEFAULT);
        TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "lora_da::fisher_update_: cublasGemmEx failed (", status, ")");
        const cudaError_t y_status = lora_da_y_update_launch(grads[k].data_ptr(), code, grads[k].stride(0),
                                                             weights.data_ptr<float>(), tokens, m,
                                                             ys[k].data_ptr<float>(), stream);
        TORCH_CHECK(y_status == cudaSuccess, "lora_da::fisher_update_: y kernel failed: ",
                    cudaGetErrorString(y_status));
    }
}

void fisher_update_meta(const at::Tensor& x, const at::Tensor& mask, at::TensorList grads,
                        const std::optional<at::Tensor>& z, at::TensorList gs, at::TensorList ys) {
    check_fisher_args(x, mask, grads, z, gs, ys);
}

}  // namespace

TORCH_LIBRARY(lora_da, m) {
    m.def("fisher_update_(Tensor x, Tensor mask, Tensor[] grads, Tensor(a!)? z, Tensor(b!)[] gs, Tensor(c!)[] ys) -> ()");
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
