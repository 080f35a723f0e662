// torch.library registration of the lora_da::* ops (CUDA implementations, meta kernels).
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>
#include <torch/torch.h>

cudaError_t lora_da_axpy_launch(float* y, const float* x, float alpha, int64_t n, cudaStream_t stream);

namespace {

// y [N] (fp32, CUDA, contiguous) += alpha * x [N]; in place.
void axpy_cuda(at::Tensor& y, const at::Tensor& x, double alpha) {
    TORCH_CHECK(y.is_cuda() && x.is_cuda(), "lora_da::axpy_ needs CUDA tensors");
    TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat, "lora_da::axpy_ takes float32");
    TORCH_CHECK(y.is_contiguous() && x.is_contiguous(), "lora_da::axpy_ takes contiguous tensors");
    TORCH_CHECK(y.sizes() == x.sizes(), "lora_da::axpy_: shapes differ ", y.sizes(), " vs ", x.sizes());
    const cudaError_t status = lora_da_axpy_launch(
        y.data_ptr<float>(), x.data_ptr<float>(), static_cast<float>(alpha), y.numel(),
        at::cuda::getCurrentCUDAStream(y.get_device()).stream());
    TORCH_CHECK(status == cudaSuccess, "lora_da::axpy_ launch failed: ", cudaGetErrorString(status));
}

void axpy_meta(at::Tensor& y, const at::Tensor& x, double alpha) {
    TORCH_CHECK(y.sizes() == x.sizes(), "lora_da::axpy_: shapes differ ", y.sizes(), " vs ", x.sizes());
}

}  // namespace

TORCH_LIBRARY(lora_da, m) {
    m.def("axpy_(Tensor(a!) y, Tensor x, float alpha) -> ()");
}

TORCH_LIBRARY_IMPL(lora_da, CUDA, m) { m.impl("axpy_", &axpy_cuda); }

TORCH_LIBRARY_IMPL(lora_da, Meta, m) { m.impl("axpy_", &axpy_meta); }

// The shared object is loaded with torch.ops.load_library; this keeps it importable as a module too.
extern "C" {
#include <Python.h>
PyMODINIT_FUNC PyInit__C(void) {
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
    return PyModule_Create(&module);
}
}
