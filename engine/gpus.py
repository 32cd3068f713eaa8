"""The GPUs `lorafuse plan` plans for: their memory and bf16 peak (no torch import: `lorafuse --help` lists them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # as the GPU reports it (nvidia-smi's total)
    bf16_tflops: float  # dense, from the datasheet
    pattern: str  # matches the lower-cased device name that a benchmark results file records


GPUS = {
    "H100": Gpu("H100 SXM 80GB", 79.6, 989.4, r"h100(?!.*pcie)"),
    "H100-PCIE": Gpu("H100 PCIe 80GB", 79.6, 756.0, r"h100.*pcie"),
    "H200": Gpu("H200 141GB", 140.4, 989.4, r"h200"),
    "A100-80GB": Gpu("A100 80GB", 80.0, 312.0, r"a100.*80\s*gb"),
    "A100-40GB": Gpu("A100 40GB", 40.0, 312.0, r"a100(?!.*80\s*gb)"),
    "L40S": Gpu("L40S 48GB", 45.0, 362.1, r"l40s"),
    "L4": Gpu("L4 24GB", 22.5, 121.0, r"\bl4\b"),
}


def gpu_spec(name: str) -> Gpu:
    key = name.upper()
    if key not in GPUS:
        raise ValueError(f"--gpu {name}: unknown GPU; known: {', '.join(GPUS)}")
    return GPUS[key]
