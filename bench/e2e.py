"""End-to-end LoRA training benchmark: stock HF transformers + PEFT against lorafuse, side by side.

Every system trains the same model (built from its config below, random bf16 weights, seeded, built
directly on the GPU), with the same LoRA (r=16, alpha=32, all seven projections, identical initial
adapters), on the same documents, with the same tokens per optimizer step, the same AdamW on the
LoRA parameters and the same gradient clipping. Cases:

  stock               HF + PEFT: micro-batches of --stock-batch-size documents padded to the longest,
                      SDPA, HF gradient checkpointing (non-reentrant), HF's own loss (logits in float32),
                      normalised by the step's target tokens (num_items_in_batch) as lorafuse does
  lorafuse-none       lorafuse: all documents of the step packed into one micro-batch, the fused Triton
  lorafuse-recompute  kernels, and per-layer checkpointing none / recompute / offload
  lorafuse-offload    (lorafuse.engine.activations.LayerCheckpointer); each step is the engine's own
                      train_step, exactly as `lorafuse train` runs it
  liger               peer, only if liger_kernel imports: stock with Liger-Kernel's RMSNorm, RoPE, SwiGLU
                      and fused linear cross-entropy patched into the HF model
  hf_packed           peer: stock without padding: each micro-batch's documents concatenated into one row,
                      position_ids restarting per document (HF builds the document mask from them)
  hf_patched          stock's step (what a transformers Trainer step runs: the HF + PEFT model called with
                      labels and num_items_in_batch, HF gradient checkpointing) on the same padded batches, with
                      the model under lorafuse.patch: its forward runs on lorafuse's kernels, padding skipped

Initial adapters: PEFT's initialisation (A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0) drawn per module path from
a seeded generator and written alike into PEFT's lora_A/lora_B and lorafuse's LoraLinear parameters, so
systems built in different processes start equal; every row records weights_fingerprint and
lora_fingerprint to show it.

Data: one seeded stream of documents, lengths lognormal (median --doc-median, sigma --doc-sigma, capped
at --doc-max), uniform random token ids, every token trained; the stream is cut into steps of exactly
--tokens-per-step tokens (the document crossing a step boundary is split there). Step i is the same
documents for every system.

One model is built per group of cases that can share it: stock, hf_packed and hf_patched (one HF + PEFT
model; the batching differs, hf_patched patches it), the three lorafuse modes (one model, a new checkpointer
each), liger alone. Each case starts from the same initial adapters with a fresh optimizer. Work on a model
runs in this order: training of the main cases, their max-context searches, then the peers' training, so
that a tight --time-budget-s cuts the peers first.

Per case, after --warmup steps, --steps timed steps (CUDA events around the whole step: forward,
backward, clipping, optimizer): step time (median), useful tokens/s (document tokens, no padding, per
median step), peak memory (torch.cuda.max_memory_allocated over the timed steps, GiB, weights
included), MFU (DESIGN.md's model FLOPs, lorafuse.engine.metrics.training_flops, over the measured
bf16 matmul peak, lorafuse.engine.metrics.peak_matmul_flops), and the loss of every step (warm-up
included: step 1 is comparable across systems since the adapters start identical). Then, per
--max-context case, the largest single document that trains one step: doubling from
--max-context-start, then bisection to --max-context-step tokens, bounded by a time budget.

    python bench/e2e.py --model llama-3.1-8b --out /tmp/e2e.json
    python bench/e2e.py --model llama-3.2-1b --systems stock lorafuse-recompute --max-context none
    python bench/e2e.py --model tiny --device cpu --tokens-per-step 512 --doc-median 40 --doc-max 200 \\
        --max-context-start 64 --max-context-step 32 --max-context-limit 256     # CPU smoke run

On CPU (smoke mode: float32, LORAFUSE_KERNELS=reference) the step time is wall-clock and the CUDA-only
figures (peak memory, MFU) are None.

This file is the command line; the parts are the modules bench/harness/e2e_*.py (bench/README.md lists them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "harness"))  # its modules; PYTHONSAFEPATH=1 adds no path

from e2e_cases import CASES, DEFAULT_CASES, DEFAULT_MAX_CONTEXT  # noqa: E402
from e2e_data import DataMix  # noqa: E402
from e2e_driver import run  # noqa: E402
from e2e_models import MODELS  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="llama-3.1-8b", choices=sorted(MODELS))
    parser.add_argument("--systems", nargs="+", default=DEFAULT_CASES, choices=sorted(CASES),
                        help="cases to run (liger / hf_packed are skipped when unavailable)")
    parser.add_argument("--max-context", nargs="*", default=DEFAULT_MAX_CONTEXT,
                        choices=sorted(CASES) + ["none"], help="cases to run the max-context search for")
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--stock-batch-size", type=int, default=4, help="documents per padded HF micro-batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--doc-median", type=float, default=400.0)
    parser.add_argument("--doc-sigma", type=float, default=1.0)
    parser.add_argument("--doc-max", type=int, default=4096)
    parser.add_argument("--doc-min", type=int, default=16)
    parser.add_argument("--max-context-start", type=int, default=4096)
    parser.add_argument("--max-context-step", type=int, default=1024, help="bisection granularity (tokens)")
    parser.add_argument("--max-context-limit", type=int, default=1 << 20)
    parser.add_argument("--max-context-budget-s", type=float, default=120.0, help="time budget per searched case")
    parser.add_argument("--time-budget-s", type=float, default=0.0, help="whole run (0: none)")
    parser.add_argument("--out", default=None, help="JSON results file (rewritten after every case)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU here")
        if args.device.index is None:
            args.device = torch.device("cuda", torch.cuda.current_device())
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    args.dtype = getattr(torch, args.dtype)
    args.max_context = [c for c in args.max_context if c != "none"]
    args.mix = DataMix(median=args.doc_median, sigma=args.doc_sigma, max_len=args.doc_max, min_len=args.doc_min)
    args.command = " ".join(["python", "bench/e2e.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    if args.out:
        print(f"[e2e] wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
