"""The cuBLAS path's producer kernels (rms_norm_lora.py, swiglu_lora.py) compile for sm_80 and sm_90 within their
shared memory (kernels/aot.py's compile_spec; no GPU needed). Kept apart from kernels/aot.py's module list so
the two change independently; `python -m lorafuse.kernels.aot` may list them too."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import importlib
from lorafuse.kernels.aot import ARCHS, SHARED_LIMIT, compile_spec
failures = 0
for name in ("rms_norm_lora", "swiglu_lora"):
    for spec in importlib.import_module(f"lorafuse.kernels.{name}").AOT_SPECS:
        for arch in ARCHS:
            try:
                shared = compile_spec(spec, arch).metadata.shared
            except Exception as e:
                failures += 1
                print("FAIL", name, spec.kernel.__name__, arch, type(e).__name__, str(e).splitlines()[0][:300])
                continue
            ok = shared <= SHARED_LIMIT[arch]
            failures += not ok
            print("ok  " if ok else "FAIL", name, spec.kernel.__name__, arch, spec.constexprs, f"shared={shared}")
print(failures, "failure(s)")
raise SystemExit(1 if failures else 0)
"""


def test_producer_kernels_compile_for_a100_and_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
