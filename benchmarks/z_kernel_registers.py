"""Registers and spills of the Triton Z kernel's autotuning configs, compiled for a GPU without one:

    python benchmarks/z_kernel_registers.py                   # sm_90a (H100, H200) and sm_89 (RTX 4090)

Each config of ``fisher_triton._Z_CONFIGS`` is compiled for bf16 inputs and compacted tokens into
an fp32 Z (FLUSH_TOKENS 0) and into an fp64 Z flushed every 64 and 256 tokens
(``massive.flush_tokens``), and its PTX assembled by Triton's own ``ptxas -v``: registers per
thread, and the bytes spilled to local memory, which cost time that only a GPU can measure.
Writes z_kernel_registers.json under $OUT (default ./outputs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # the GPU's configs

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lora_da.kernels import fisher_triton  # noqa: E402

TARGETS = {"sm_90a": 90, "sm_89": 89}
SIGNATURE = {"x_ptr": "*bf16", "order_ptr": "*i32", "count_ptr": "*i32", "count_value": "i32", "z_ptr": "*fp64",
             "n": "i32", "stride_xt": "i32", "stride_zn": "i32", "DTYPE_KEY": "i32", "Z_KEY": "i32", "T_BUCKET": "i32"}


def ptxas_report(ptx: str, gpu: str) -> dict:
    """{registers, spill stores, spill loads} of ``ptx`` assembled for ``gpu`` by Triton's ptxas."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        text = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu}", source.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "spill stores": number(r"(\d+) bytes spill stores"),
            "spill loads": number(r"(\d+) bytes spill loads")}


def compile_config(config, flush: int, arch: int) -> str:
    """PTX of ``_z_upper_kernel`` in ``config`` with FLUSH_TOKENS ``flush`` (an fp32 Z when 0)."""
    kernel = fisher_triton._z_upper_kernel.fn
    constants = {"COMPACTED": True, "IEEE": False, "CAST_F32": False, "FLUSH_TOKENS": flush, **config.kwargs}
    signature = {**SIGNATURE, "z_ptr": "*fp64" if flush else "*fp32", **{name: "constexpr" for name in constants}}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--configs", nargs="+", metavar="SHAPE",
                        help='only these configs, as the table writes them, e.g. "64, 64, 0, 8, 3"')
    args = parser.parse_args(argv)
    records = []
    print(f"triton {triton.__version__}")
    print("| target | BLOCK_N, BLOCK_T, programs per SM, warps, stages | FLUSH_TOKENS | registers | spill stores / loads (bytes) |")
    print("| --- | --- | --- | --- | --- |")
    for gpu in args.targets:
        for config in fisher_triton._Z_CONFIGS:
            shape = (f"{config.kwargs['BLOCK_N']}, {config.kwargs['BLOCK_T']}, {config.kwargs['PROGRAMS_PER_SM']}, "
                     f"{config.num_warps}, {config.num_stages}")
            if args.configs and shape not in args.configs:
                continue
            for flush in (0, 64, 256):
                report = ptxas_report(compile_config(config, flush, TARGETS[gpu]), gpu)
                records.append({"target": gpu, "config": shape, "flush": flush, **report})
                print(f"| {gpu} | {shape} | {flush} | {report['registers']} | "
                      f"{report['spill stores']} / {report['spill loads']} |")
    out = Path(os.environ.get("OUT", ROOT / "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "z_kernel_registers.json").write_text(json.dumps({"triton": triton.__version__, "records": records}, indent=1))


if __name__ == "__main__":
    main()
