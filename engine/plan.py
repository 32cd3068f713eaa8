"""`lorafuse plan`: what a run will take, before any GPU time: steps, tokens, memory per GPU, time and money.

It reads the data as `train` does (validated, through the data gate, tokenized, packed: the step count is
exact) and the model's config.json (the model is built on the meta device: shapes, no weights), then:

  tokens per epoch and trained (target) tokens, and the padding packing avoids: padded batches of the
  same documents (as many per batch as fit the token budget at the longest document, in the same
  shuffled order, each padded to its longest) compute more tokens in more micro-batches;
  memory per GPU (estimate_memory): frozen weights, LoRA state, activations at the checkpointing
  planner's peak (activations/planner.py), the loss workspace; and the largest max_tokens_per_step that
  fits the GPU per checkpointing mode, leaving HEADROOM_BYTES and FRAGMENTATION of it for what torch does
  not count (CUDA context, cuBLAS workspaces) and for its caching allocator;
  time and money per epoch: the epoch's model FLOPs (metrics.training_flops, DESIGN.md) over the
  throughput that bench/results/*.json records for lorafuse on this GPU, from the recorded model nearest
  in size and scaled by FLOPs per token; with none recorded, over an assumed MFU of the GPU's bf16 peak,
  and the plan says so. Several GPUs (--gpus, as torchrun runs them) are taken to scale linearly.

The memory figures are what torch.cuda.max_memory_allocated would count; tests/engine/test_plan.py checks
them against the allocations of a tiny model's training step through the same Triton kernels on the CPU.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .activations.planner import (
    estimate_peak_bytes,
    layer_bytes_per_token,
    layer_modes,
    plan_for_model,
    resident_bytes,
)
from .config import Config
from .gpus import Gpu, gpu_spec
from .metrics import causal_attention_flops, matmul_parameters, training_flops
from .model import count_parameters

GIB = 2**30
HEADROOM_BYTES = 1 * GIB  # CUDA context and cuBLAS workspaces: on the GPU, not in torch's count
FRAGMENTATION = 0.05  # of the GPU's memory, left to the caching allocator's rounding and fragmentation
ASSUMED_MFU = 0.35  # without a recorded benchmark: a LoRA step on our kernels, of the bf16 peak
RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"  # in a checkout of the repository
TOKEN_STEP = 256  # the largest max_tokens_per_step that fits is rounded down to a multiple of this
SEARCHED_UP_TO = 1 << 22  # tokens per micro-batch


@dataclass
class MemoryEstimate:
    weights: int
    lora: int  # float32 masters, gradients, two Adam moments, the guard's copy of masters and moments
    activations: int  # peak of what the decoder layers keep for backward, per the checkpointing modes
    loss_workspace: int
    modes: list[str]

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.loss_workspace


def estimate_memory(model, tokens: int, dtype: torch.dtype, checkpointing: str, *, lora_rank: int,
                    lora_projections: int, budget_bytes: float = 0.0) -> MemoryEstimate:
    """Peak device memory of one training step of `tokens` tokens on a LoRA model (loaded, or built on the
    meta device). checkpointing: none | recompute | offload for every layer, or "auto": the modes
    plan_for_model picks to fit budget_bytes (train.memory_budget_gb)."""
    kept, layer_input = layer_bytes_per_token(model, dtype, lora_rank=lora_rank,
                                              lora_projections=lora_projections)
    if checkpointing == "auto":
        modes = plan_for_model(model, budget_bytes, tokens, dtype, lora_rank=lora_rank,
                               lora_projections=lora_projections)
    else:
        modes = layer_modes(checkpointing, model.config.num_hidden_layers)
    activations = int(estimate_peak_bytes(modes, kept, layer_input, tokens))
    return MemoryEstimate(activations=activations, modes=modes, **resident_bytes(model, tokens, dtype))


def usable_bytes(gpu: Gpu) -> float:
    total = gpu.memory_gib * GIB
    return total * (1 - FRAGMENTATION) - HEADROOM_BYTES


def largest_tokens_that_fit(fits, low: int, high: int = SEARCHED_UP_TO) -> int | None:
    """The largest multiple of TOKEN_STEP in [low, high] for which fits(tokens) holds (it shrinks as tokens
    grow); None when not even `low` fits."""
    if not fits(low):
        return None
    lo, hi = low, high
    while hi - lo > TOKEN_STEP:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return max(low, lo // TOKEN_STEP * TOKEN_STEP)


def meta_model(cfg: Config, dtype: torch.dtype):
    """The model of cfg.model with its LoRA adapters, on the meta device: every shape, no memory, no weights (with
    quantize: nf4, or a bitsandbytes NF4 checkpoint, its projections as NF4 buffers of the sizes a load gives)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .lora import inject_lora
    from .model import read_config
    from .quantize import checkpoint_quantization, quantize_meta

    config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    stored = checkpoint_quantization(read_config(cfg.model), cfg.model)
    if hasattr(config, "quantization_config"):  # counted below as NF4; HF would want bitsandbytes for it
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    if cfg.quantize == "nf4" or stored:
        quantize_meta(model)
    inject_lora(model, cfg.lora)
    return model


# ----------------------------------------------------------------------------------------------
# Throughput: recorded, or assumed


def results_on(results_dir: Path, gpu: Gpu) -> list[tuple[str, dict]]:
    """(file name, contents) of the benchmark results files recorded on this GPU."""
    found = []
    for path in sorted(Path(results_dir).glob("*.json")) if Path(results_dir).is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and re.search(gpu.pattern, str(data.get("gpu") or "").lower()):
            found.append((path.name, data))
    return found


def recorded_throughput(results_dir: Path, gpu: Gpu, n_frozen: int, checkpointing: str) -> dict | None:
    """The recorded lorafuse benchmark row on this GPU nearest this model in size (the same checkpointing
    mode preferred), with its achieved model FLOP/s; None when no results file records one."""
    rows = []
    for name, data in results_on(results_dir, gpu):
        for row in data.get("e2e") or []:
            if row.get("system") != "lorafuse" or not row.get("tokens_per_s") or not row.get("n_frozen"):
                continue
            if row.get("model_tflops_per_step") and row.get("step_time_s"):
                flops_per_s = row["model_tflops_per_step"] * 1e12 / row["step_time_s"]
            else:  # DESIGN.md's count without attention: a little low, so time comes out a little long
                flops_per_s = row["tokens_per_s"] * training_flops(row["n_frozen"], row.get("n_lora", 0), 1)
            rows.append({"file": name, "model": row.get("model"), "case": row.get("case"),
                         "n_frozen": row["n_frozen"], "tokens_per_s": row["tokens_per_s"],
                         "flops_per_s": flops_per_s, "mfu": row.get("mfu")})
    if not rows:
        return None
    return min(rows, key=lambda r: (r["case"] != f"lorafuse-{checkpointing}", abs(math.log(r["n_frozen"] / n_frozen))))


def measured_peak_tflops(results_dir: Path, gpu: Gpu) -> float | None:
    """The bf16 matmul peak a results file measured on this GPU (DESIGN.md: MFU against the measured peak)."""
    found = [float(d["peak_bf16_tflops"]) for _, d in results_on(results_dir, gpu) if d.get("peak_bf16_tflops")]
    return max(found) if found else None


# ----------------------------------------------------------------------------------------------
# The plan


def padded_batches(lengths: list[int], max_tokens: int, seed: int) -> tuple[int, int]:
    """(micro-batches, tokens computed) of padded batches of these documents: as many per batch as fit
    max_tokens at the longest document, in a seeded shuffled order, each padded to its longest."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    per_batch = max(1, max_tokens // max(order))
    chunks = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
    return len(chunks), sum(len(c) * max(c) for c in chunks)


def make_plan(cfg: Config, gpu: str = "H100", gpus: int = 1, price_per_hour: float | None = None,
              mfu: float = ASSUMED_MFU, results_dir: Path = RESULTS_DIR, log=print) -> dict:
    """The plan as a dict, each part also said as a [plan] line through log."""
    from .model import check_supported, load_tokenizer
    from .train import load_datasets, plan_steps, warmup_steps

    spec, t = gpu_spec(gpu), cfg.train
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    check_supported(cfg.model, weights=False)  # planning comes before downloading the weights
    docs = load_datasets(cfg, load_tokenizer(cfg.model), log)
    steps = plan_steps(docs["train"], t, micro_per_step=t.grad_accum * gpus, mixture=docs.get("mix"))
    dtype = torch.bfloat16 if t.dtype == "auto" else getattr(torch, t.dtype)
    model = meta_model(cfg, dtype)
    n_frozen, n_lora = count_parameters(model)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    plan: dict = {"gpu": gpu.upper(), "gpus": gpus, "dtype": str(dtype).removeprefix("torch."),
                  "parameters": {"frozen": n_frozen, "lora": n_lora}}

    # ---- steps and tokens
    epochs = sorted({e for e, _ in steps})
    per_epoch = []
    for epoch in epochs:
        batches = [b for e, micro in steps if e == epoch for b in micro]
        lengths = [n for b in batches for n in b.doc_lengths]
        flops = training_flops(matmul_parameters(model), n_lora, sum(lengths),
                               causal_attention_flops(lengths, c.num_attention_heads, head_dim, c.num_hidden_layers))
        padded_micro, padded_tokens = padded_batches(lengths, t.max_tokens_per_step, t.seed + epoch)
        per_epoch.append({"epoch": epoch, "steps": sum(1 for e, _ in steps if e == epoch),
                          "micro_batches": len(batches), "documents": len(lengths), "tokens": sum(lengths),
                          "trained_tokens": sum(b.num_target_tokens for b in batches), "model_flops": flops,
                          "padded_micro_batches": padded_micro, "padded_tokens": padded_tokens})
    first = per_epoch[0]
    total_tokens = sum(e["tokens"] for e in per_epoch)
    plan.update(steps=len(steps), warmup_steps=warmup_steps(len(steps), t), epochs=per_epoch,
                tokens=total_tokens, trained_tokens=sum(e["trained_tokens"] for e in per_epoch))
    log(f"[plan] {len(steps)} optimizer steps ({len(epochs)} epoch(s) of about {first['steps']}; each step "
        f"{t.grad_accum} micro-batch(es) of up to {t.max_tokens_per_step} tokens on each of {gpus} GPU(s)), "
        f"{plan['warmup_steps']} of them warmup")
    log(f"[plan] tokens per epoch {first['tokens']:,}, of them trained {first['trained_tokens']:,} "
        f"({first['trained_tokens'] / first['tokens']:.1%}); the whole run {total_tokens:,} tokens, "
        f"{plan['trained_tokens']:,} trained")
    waste = 1 - first["tokens"] / first["padded_tokens"]
    log(f"[plan] packing: {first['micro_batches']} micro-batches per epoch, no padding; padded batches of the same "
        f"documents would be {first['padded_micro_batches']} computing {first['padded_tokens']:,} tokens, "
        f"{waste:.0%} of them padding")

    # ---- memory
    mode = "auto" if t.memory_budget_gb > 0 else t.checkpointing
    est = estimate_memory(model, t.max_tokens_per_step, dtype, mode, lora_rank=cfg.lora.r,
                          lora_projections=len(cfg.lora.target_modules), budget_bytes=t.memory_budget_gb * GIB)
    usable = usable_bytes(spec)
    plan["memory"] = {"tokens": t.max_tokens_per_step, "checkpointing": mode, "weights": est.weights,
                      "lora": est.lora, "activations": est.activations, "loss_workspace": est.loss_workspace,
                      "total": est.total, "gpu_bytes": spec.memory_gib * GIB, "usable_bytes": usable,
                      "fits": est.total <= usable}
    log(f"[plan] memory per GPU at {t.max_tokens_per_step} tokens per micro-batch (checkpointing {mode}): weights "
        f"{_size(est.weights)} + LoRA and optimizer {_size(est.lora)} + activations {_size(est.activations)} + loss "
        f"workspace {_size(est.loss_workspace)} = {_size(est.total)} of the {spec.name}'s {spec.memory_gib:g} GiB"
        + ("" if est.total <= usable else ": DOES NOT FIT"))
    largest = {}
    for m in dict.fromkeys([mode, "none", "recompute", "offload"]):
        fits = lambda n, m=m: estimate_memory(  # noqa: E731
            model, n, dtype, m, lora_rank=cfg.lora.r, lora_projections=len(cfg.lora.target_modules),
            budget_bytes=usable).total <= usable
        largest[m] = largest_tokens_that_fit(fits, t.max_seq_len)
    plan["largest_max_tokens_per_step"] = largest
    log(f"[plan] largest train.max_tokens_per_step that fits the {spec.name} (leaving {HEADROOM_BYTES / GIB:g} GiB "
        f"and {FRAGMENTATION:.0%} for the CUDA context and the allocator): "
        + ", ".join(f"{n:,}{'+' if n >= SEARCHED_UP_TO - TOKEN_STEP else ''} with checkpointing {m}" if n
                    else f"none at all with checkpointing {m}" for m, n in largest.items()))

    # ---- time and money
    row = recorded_throughput(results_dir, spec, n_frozen, mode)
    if row is not None:
        flops_per_s = row["flops_per_s"]
        source = (f"recorded: {row['file']}, {row['case']} on {row['model']} at {row['tokens_per_s']:,.0f} tokens/s, "
                  "scaled to this model by FLOPs per token")
    else:
        peak = measured_peak_tflops(results_dir, spec)
        flops_per_s = mfu * (peak or spec.bf16_tflops) * 1e12
        source = (f"no benchmark of lorafuse on {spec.name} is recorded in bench/results: from the FLOP count at an "
                  f"assumed {mfu:.0%} MFU of its {'measured' if peak else 'datasheet'} bf16 peak of "
                  f"{peak or spec.bf16_tflops:g} TFLOP/s")
    seconds = [e["model_flops"] / (flops_per_s * gpus) for e in per_epoch]
    plan["time"] = {"source": source, "model_flops_per_s_per_gpu": flops_per_s, "seconds_per_epoch": seconds,
                    "seconds": sum(seconds), "recorded": row}
    money = ""
    if price_per_hour is not None:
        cost = [s / 3600 * price_per_hour * gpus for s in seconds]
        plan["cost"] = {"price_per_gpu_hour": price_per_hour, "per_epoch": cost, "total": sum(cost)}
        money = f"; at {price_per_hour:g} per GPU-hour {cost[0]:.2f} per epoch, {sum(cost):.2f} for the run"
    log(f"[plan] time on {gpus} x {spec.name}: {_duration(seconds[0])} per epoch, {_duration(sum(seconds))} for "
        f"the run{money} ({source})")
    return plan


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
