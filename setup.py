"""Builds the optional CUDA extension ``lora_da._C``; metadata lives in pyproject.toml.

The extension is built when torch is a CUDA build and nvcc is found; otherwise the package
installs without it and says why. ``LORA_DA_REQUIRE_CUDA=1`` turns a skip or a failed build
into an error. Install with ``pip install --no-build-isolation`` so that this file sees torch.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

REQUIRE_CUDA = os.environ.get("LORA_DA_REQUIRE_CUDA", "0") == "1"
SOURCES = ["csrc/ops.cpp", "csrc/fisher.cu"]
VERSIONED_LIBS = ("cublas", "cusolver")


def say(message):
    print(f"lora_da setup: {message}", file=sys.stderr)


def skip(reason):
    if REQUIRE_CUDA:
        raise RuntimeError(f"LORA_DA_REQUIRE_CUDA=1 but the CUDA extension cannot be built: {reason}")
    say(f"building without the CUDA extension: {reason}")
    return {}


def nvidia_wheel_dirs():
    """include and lib folders of the nvidia-* wheels next to torch (cu13 layout or per-library)."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    includes = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    libs = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    return includes, libs


def versioned_link_args(lib_dirs):
    """-l:libX.so.N for cuBLAS/cuSOLVER: the wheels ship only versioned names."""
    args = []
    for name in VERSIONED_LIBS:
        found = sorted(p for d in lib_dirs for p in glob.glob(os.path.join(d, f"lib{name}.so.*")))
        if found:
            args.append(f"-l:{os.path.basename(found[0])}")
        else:
            say(f"lib{name} not found in the nvidia wheels; linking without it")
    return args


def cuda_build_options():
    try:
        import torch
    except ImportError:
        return skip("torch is not importable at build time (install with pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        found = shutil.which("nvcc")
        if found is None:
            return skip(f"nvcc not found (CUDA_HOME={cuda_home}, PATH)")
        cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(found)))
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    # needed when no GPU is visible; PTX for the newest listed, so that later GPUs compile it at load
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    includes, libs = nvidia_wheel_dirs()

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # a failed optional build must not fail the install
                if REQUIRE_CUDA:
                    raise
                say(f"building without the CUDA extension: compilation failed ({error})")
                self.extensions = [e for e in self.extensions if e is not ext]  # nothing to copy or package

    say(f"building lora_da._C with CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    extension = CUDAExtension(
        name="lora_da._C",
        sources=SOURCES,
        include_dirs=includes,
        library_dirs=libs,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=versioned_link_args(libs) + [f"-Wl,-rpath,{d}" for d in libs],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**cuda_build_options())
