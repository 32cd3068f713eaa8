"""Paper estimate of one decoder layer's LoRA projections, forward + backward, on the two LoRA GEMM paths
against the bare GEMMs of the frozen weights (bench/README.md prints its table; no measurement in it).

    python bench/lora_gemm_roofline.py [--tokens 16384] [--rank 16]

Per layer of Llama-3.1-8B (hidden 4096, intermediate 14336, 32 q heads and 8 kv heads of 128), T tokens, rank r
on all seven projections, bf16. The four GEMMs (K, N, R = the group's total rank):
  qkv (4096, 6144, 3r)   o (4096, 4096, r)   gate_up (4096, 28672, 2r)   down (14336, 4096, r)
bare:    x W^T and dY W per GEMM (no frozen weight gradient): 4 T K N FLOPs, cuBLAS efficiency.
triton:  the same GEMMs as our Triton kernels, the low-rank product inside them (+2 T R (K + N) FLOPs), at the
         Triton efficiency; plus four memory-bound passes per GEMM: U = x A^T (reads x), V = dY B (reads dY),
         dA = V^T x (reads x), dB = dY^T U (reads dY); the GLU backward sits in the dH GEMM's epilogue.
cublas:  the GEMMs K + R deep (forward) and K + R wide (backward) at cuBLAS efficiency; U and V A come from
         producers that read the rows anyway (RMSNorm for qkv and gate_up), so per GEMM only dA and dB
         stay passes over x and dY; plus what this path adds (kernels/lora_cublas.py):
           qkv:  the three dY_i are concatenated for dY [W | B] (read + write of T N)
           o:    U = x A^T (reads x), y += U B^T (read + write of y), dX += V A (read + write of dX)
           down: U and V A ride in the GLU kernels (kernels/swiglu_lora.py), but dY [W | B] cannot apply the
                 GLU backward in a cuBLAS epilogue as the Triton path's dH GEMM does: dH is written and read
                 once more (T I twice)
GEMM GB: what the GEMMs read and write themselves (each operand once; compute-bound at these sizes, so it
does not enter the time). Time of a kernel = FLOPs / (efficiency x peak) for GEMMs, bytes / (0.85 x HBM
bandwidth) for passes, summed (no overlap). H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s. Efficiencies:
cuBLAS 0.75, our Triton GEMM 0.60 (issue 15: 0.55-0.70 of peak; 0.60 gives its 1.25x).
"""

from __future__ import annotations

import argparse

PEAK_TFLOPS, HBM_TBPS = 989.0, 3.35
EFF = {"cublas": 0.75, "triton": 0.60}
BW_EFF = 0.85
BYTES = 2  # bf16


def gemms(rank: int, hidden=4096, inter=14336, q=4096, kv=1024) -> dict:
    return {"qkv": (hidden, q + 2 * kv, 3 * rank), "o": (q, hidden, rank), "gate_up": (hidden, 2 * inter, 2 * rank),
            "down": (inter, hidden, rank)}


def estimate(tokens: int = 16384, rank: int = 16) -> dict:
    """{path: {"tflop", "gemm_ms", "extra_gb", "pass_ms", "ms", "ratio"}} for one layer (module docstring)."""
    T = tokens
    out = {}
    for path in ("bare", "triton", "cublas"):
        flops = extra = moved = 0.0
        for name, (K, N, R) in gemms(rank).items():
            # what the GEMMs themselves read and write, ideally once each: x, W, y forward; dY, W, dX backward
            # (the low-rank operands ride along: K + R deep or wide)
            k_eff = K if path == "bare" else K + R
            moved += 2 * (T * k_eff + N * k_eff + T * N)
            if path == "bare":
                flops += 4 * T * K * N
                continue
            flops += 4 * T * K * N + 4 * T * R * (K + N)  # the low-rank products ride in the GEMMs
            if path == "triton":
                extra += 2 * T * (K + N)  # U, V, dA, dB: x twice, dY twice
                continue
            extra += T * (K + N)  # dA (reads x), dB (reads dY)
            if name == "qkv":
                extra += 2 * T * N  # cat of dY_q, dY_k, dY_v
            elif name == "o":
                extra += T * K + 2 * T * N + 2 * T * K  # U = x A^T; y += U B^T; dX += V A
            elif name == "down":
                extra += 2 * T * K  # dH written by the GEMM and read by the GLU backward
        eff = EFF["cublas" if path == "bare" else path]
        gemm_ms = flops / (eff * PEAK_TFLOPS * 1e12) * 1e3
        pass_ms = extra * BYTES / (BW_EFF * HBM_TBPS * 1e12) * 1e3
        out[path] = {"tflop": flops / 1e12, "gemm_gb": moved * BYTES / 1e9, "gemm_ms": gemm_ms,
                     "extra_gb": extra * BYTES / 1e9, "pass_ms": pass_ms, "ms": gemm_ms + pass_ms}
    for path in out:
        out[path]["ratio"] = out[path]["ms"] / out["bare"]["ms"]
    return out


def favoured(tokens: int = 16384, rank: int = 16) -> str:
    est = estimate(tokens, rank)
    return "cublas" if est["cublas"]["ms"] <= est["triton"]["ms"] else "triton"


def table(tokens: int = 16384, rank: int = 16) -> str:
    est = estimate(tokens, rank)
    lines = ["| path | GEMM TFLOP | GEMM GB | GEMM ms | extra passes GB | passes ms | total ms | x bare |",
             "|---|---|---|---|---|---|---|---|"]
    for path, e in est.items():
        lines.append(f"| {path} | {e['tflop']:.2f} | {e['gemm_gb']:.2f} | {e['gemm_ms']:.2f} | {e['extra_gb']:.2f} | "
                     f"{e['pass_ms']:.2f} | {e['ms']:.2f} | {e['ratio']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    print(table(args.tokens, args.rank))
    print(f"favoured: {favoured(args.tokens, args.rank)}")


if __name__ == "__main__":
    main()
