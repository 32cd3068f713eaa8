"""What the GPU compiler makes of a kernel variant, without a GPU: registers, spills, shared memory, occupancy
and the tensor-core instructions of its dots.

A variant is compiled as its launch would be (compile_launch: Triton's own launcher specialisation, see
aot_capture.py); then the PTX goes through Triton's ptxas with `-v` and the flags Triton uses, and the cubin
through cuobjdump (or nvdisasm) for the SASS: HMMA.16816 is Ampere's mma.sync m16n8k16, HGMMA.64xNx16 is
Hopper's wgmma m64nNk16. Without a disassembler the shapes come from the PTX (mma.sync / wgmma lines).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

# Per SM and per block (CUDA programming guide, compute capabilities 8.0 and 9.0): shared memory a block may
# use, shared memory per SM (each resident block also takes 1 KB of it for the system), registers, warps,
# blocks.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM = 65536, 64, 32


def ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path if _takes_arch() else get_ptxas().path


def _takes_arch() -> bool:
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas

    return bool(inspect.signature(get_ptxas).parameters)


def _tool(name: str) -> str | None:
    """nvdisasm / cuobjdump: the ones beside Triton's ptxas, else the PATH's."""
    import shutil

    here = os.path.join(os.path.dirname(ptxas_path(90)), name)
    return here if os.path.isfile(here) else shutil.which(name)


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_stats(ptx: str, arch: int) -> dict:
    """ptxas -v of the PTX with Triton's own flags (the same cubin as its compile): registers, spills."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas_path(arch), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                               src, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    return parse_ptxas(proc.stdout + proc.stderr)


def parse_ptxas(log: str) -> dict | None:
    """Registers, stack and spill bytes from a `ptxas -v` log of one kernel (None: no such log)."""
    if not _PTXAS_RE["registers"].search(log):
        return None
    return {key: int(m.group(1)) if (m := rx.search(log)) else 0 for key, rx in _PTXAS_RE.items()}


_SASS_MMA = re.compile(r"\b(HGMMA\.\d+x\d+x\d+\S*|HMMA\.\d+\S*|IMMA\.\d+\S*)")
_PTX_MMA = re.compile(r"\b(wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\S*|mma\.sync\.aligned\.m\d+n\d+k\d+\S*)")


def mma_shapes(compiled) -> tuple[dict, str]:
    """Tensor-core instructions of the kernel by shape, with counts, and where they were read ("sass"/"ptx")."""
    tool = _tool("cuobjdump")
    cubin = compiled.asm.get("cubin")
    if tool and cubin:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            proc = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
        if proc.returncode == 0:
            return dict(Counter(_shape_name(m) for m in _SASS_MMA.findall(proc.stdout))), "sass"
    return dict(Counter(_shape_name(m) for m in _PTX_MMA.findall(compiled.asm["ptx"]))), "ptx"


def _shape_name(instr: str) -> str:
    """HGMMA.64x128x16.F32.BF16 -> wgmma m64n128k16; HMMA.16816.F32.BF16 -> mma m16n8k16 (SASS or PTX)."""
    instr = instr.rstrip(";,")
    if m := re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", instr):
        return f"wgmma m{m[1]}n{m[2]}k{m[3]}"
    if m := re.match(r"([HI])MMA\.168(\d+)", instr):
        return f"mma m16n8k{m[2]}" + (" int" if m[1] == "I" else "")
    if m := re.search(r"m(\d+)n(\d+)k(\d+)", instr):
        return f"{'wgmma' if instr.startswith('wgmma') else 'mma'} m{m[1]}n{m[2]}k{m[3]}"
    return instr


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared: int) -> int:
    """Blocks one SM holds at once, limited by registers (allocated per warp in units of 256), shared memory
    and warps."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_shared = SHARED_PER_SM[arch] // (shared + 1024) if shared else MAX_CTAS_PER_SM
    return max(0, min(by_regs, by_warps, by_shared, MAX_CTAS_PER_SM))
