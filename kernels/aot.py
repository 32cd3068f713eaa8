"""Compile every Triton kernel for NVIDIA GPUs without one (ahead of time, no launch).

`python -m lorafuse.kernels.aot` builds each kernel variant that a kernel module lists in its
AOT_SPECS for sm_80 (A100) and sm_90 (H100/H200) and prints the shared memory each needs. The
CPU test suite runs it, so a kernel that the interpreter accepts but the GPU compiler rejects
(tl.dot shapes, layouts, too much shared memory) fails in CI, not on a rented GPU.

Each variant is an _launch.AotSpec, written with _launch.aot_spec: the kernel, the Triton type of each
argument, the constexpr values, and the launch options of an autotune config.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from lorafuse._interpreter import interpreter_requested

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use
MODULES = ("lora_linear", "fused_linear_cross_entropy", "varlen_attention", "rope", "rms_norm", "swiglu", "nf4")


def compile_spec(spec, arch: int):
    """Compile an _launch.AotSpec for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget

    # A real launch tells the compiler which pointers are 16-byte aligned (torch's allocations are):
    # claim it for every pointer. Integer arguments (strides) stay unspecialised, so loads whose
    # vectorisation needs aligned strides compile here as they would for odd strides.
    attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(spec.signature.values()) if ty.startswith("*")}
    src = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))


def main() -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    if interpreter_requested():
        print("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU", file=sys.stderr)
        return 2
    failures = 0
    for name in MODULES:
        module = importlib.import_module(f"lorafuse.kernels.{name}")
        for spec in getattr(module, "AOT_SPECS", ()):
            label = f"{name}.{spec.kernel.__name__}"
            shown = ",".join([f"{k}={v}" for k, v in spec.constexprs.items() if k.isupper()]
                             + [f"{k}={v}" for k, v in spec.options.items()])
            for arch in ARCHS:
                t0 = time.perf_counter()
                try:
                    compiled = compile_spec(spec, arch)
                except Exception as e:  # report every failing variant, not just the first
                    failures += 1
                    print(f"FAIL sm_{arch} {label} [{shown}]: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    continue
                shared = compiled.metadata.shared
                ok = shared <= SHARED_LIMIT[arch]
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} sm_{arch} {label} [{shown}] shared={shared}B "
                      f"warps={compiled.metadata.num_warps} {time.perf_counter() - t0:.1f}s")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
