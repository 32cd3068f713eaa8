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
  lorafuse-offload    (engine/checkpointing.py's LayerCheckpointer)
  liger               peer, only if liger_kernel imports: stock with Liger-Kernel's RMSNorm, RoPE, SwiGLU
                      and fused linear cross-entropy patched into the HF model
  hf_packed           peer: stock without padding: each micro-batch's documents concatenated into one row,
                      position_ids restarting per document (HF builds the document mask from them)

Initial adapters: PEFT's initialisation (A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0) drawn per module path from
a seeded generator and written alike into PEFT's lora_A/lora_B and lorafuse's LoraLinear parameters, so
systems built in different processes start equal; every row records weights_fingerprint and
lora_fingerprint to show it.

Data: one seeded stream of documents, lengths lognormal (median --doc-median, sigma --doc-sigma, capped
at --doc-max), uniform random token ids, every token trained; the stream is cut into steps of exactly
--tokens-per-step tokens (the document crossing a step boundary is split there). Step i is the same
documents for every system.

One model is built per group of cases that can share it: stock and hf_packed (one HF + PEFT model, only
the batching differs), the three lorafuse modes (one model, a new checkpointer each), liger alone. Each
case starts from the same initial adapters with a fresh optimizer. Work on a model runs in this order:
training of the main cases, their max-context searches, then the peers' training, so that a tight
--time-budget-s cuts the peers first.

Per case, after --warmup steps, --steps timed steps (CUDA events around the whole step: forward,
backward, clipping, optimizer): step time (median), useful tokens/s (document tokens, no padding, per
median step), peak memory (torch.cuda.max_memory_allocated over the timed steps, GiB, weights
included), MFU (DESIGN.md's model FLOPs, lorafuse.engine.metrics.flops_per_token, over the measured
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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GIB = 2**30
IGNORE_INDEX = -100
LORA_R, LORA_ALPHA = 16, 32.0
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FIRST_TOKEN = 3  # random token ids start here (below: what tokenizers use for pad/bos/eos)

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# The shapes of the real models (config.json of each, as published), so nothing is downloaded.
MODELS: dict[str, dict] = {
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=128000, eos_token_id=128001, rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False, sliding_window=None,
        max_window_layers=28, bos_token_id=151643, eos_token_id=151643,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "mistral-7b": dict(  # v0.3: 32768 vocabulary, no sliding window
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", sliding_window=None,
        bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "llama-3.2-1b": dict(  # for smaller GPUs
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=128000, eos_token_id=128001, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "tiny": dict(  # the CPU smoke test
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

# case -> (system, checkpointing)
CASES: dict[str, tuple[str, str]] = {
    "stock": ("stock", "hf"),
    "lorafuse-none": ("lorafuse", "none"),
    "lorafuse-recompute": ("lorafuse", "recompute"),
    "lorafuse-offload": ("lorafuse", "offload"),
    "liger": ("liger", "hf"),
    "hf_packed": ("hf_packed", "hf"),
}
HF_CASES = ("stock", "liger", "hf_packed")
DEFAULT_CASES = ["stock", "lorafuse-none", "lorafuse-recompute", "lorafuse-offload", "liger", "hf_packed"]
DEFAULT_MAX_CONTEXT = ["stock", "lorafuse-recompute", "lorafuse-offload"]


# ---------------------------------------------------------------------------------------------
# Data: one seeded stream of documents, cut into steps
# ---------------------------------------------------------------------------------------------


@dataclass
class DataMix:
    median: float = 400.0
    sigma: float = 1.0
    max_len: int = 4096
    min_len: int = 16


def make_steps(n_steps: int, tokens_per_step: int, vocab_size: int, mix: DataMix, seed: int) -> list[list]:
    """n_steps lists of Documents of exactly tokens_per_step tokens each, every token trained.

    Document lengths are lognormal (median mix.median, sigma mix.sigma) clipped to [min_len, max_len]; a
    document that does not fit the rest of a step is split, its tail opening the next step. The stream
    depends only on the arguments, so every system and every process sees the same steps.
    """
    from lorafuse.engine.data import Document

    rng = np.random.default_rng(seed)
    steps: list[list] = []
    current: list[np.ndarray] = []
    room = tokens_per_step
    pending: np.ndarray | None = None
    while len(steps) < n_steps:
        if pending is None:
            n = int(np.clip(round(rng.lognormal(math.log(mix.median), mix.sigma)), mix.min_len, mix.max_len))
            pending = rng.integers(FIRST_TOKEN, vocab_size, n, dtype=np.int64)
        take = min(room, len(pending))
        current.append(pending[:take])
        pending = pending[take:] if take < len(pending) else None
        room -= take
        if room == 0:
            steps.append([Document(ids, np.ones(len(ids), dtype=bool)) for ids in current])
            current, room = [], tokens_per_step
    return steps


def single_document(tokens: int, vocab_size: int, seed: int):
    """One document of `tokens` random tokens (the max-context probe)."""
    from lorafuse.engine.data import Document

    ids = np.random.default_rng([seed, tokens]).integers(FIRST_TOKEN, vocab_size, tokens, dtype=np.int64)
    return Document(ids, np.ones(tokens, dtype=bool))


def target_tokens(docs) -> int:
    """Tokens the loss is taken over: every trained token but each document's first."""
    return int(sum(d.trained[1:].sum() for d in docs))


@dataclass
class _Lengths:
    """What flops_per_token reads of a micro-batch."""

    doc_lengths: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.doc_lengths)


# ---------------------------------------------------------------------------------------------
# Models and adapters
# ---------------------------------------------------------------------------------------------


def model_config(name: str, layers: int | None = None):
    from transformers import AutoConfig

    spec = dict(MODELS[name])
    if layers:
        spec["num_hidden_layers"] = layers
        if "max_window_layers" in spec:
            spec["max_window_layers"] = layers
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int, layers: int | None = None):
    """The HF model with random weights, created and initialised on `device` (an 8B model never touches
    the host), frozen. The same seed gives the same weights in every process on the same device type."""
    from transformers import AutoModelForCausalLM

    config = model_config(name, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def fingerprint(tensors) -> float:
    """A cheap checksum of a sequence of tensors (their first 4096 elements each, position-weighted): equal
    fingerprints show that two systems started from the same weights or adapters."""
    total = 0.0
    sums = [t.detach().reshape(-1)[:4096].double().sum() for t in tensors]
    if sums:
        total = float(sum((i % 13 + 1) * s for i, s in enumerate(sums)))
    return total


def weights_fingerprint(model) -> float:
    return fingerprint([p for _, p in sorted(model.named_parameters())])


def expected_lora_parameters(config, r: int = LORA_R) -> int:
    """LoRA parameters of r on the seven projections of every layer: r * (in + out) each."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    return r * per_layer * config.num_hidden_layers


def peft_lora_pairs(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path in the HF model: (lora_A weight [r, in], lora_B weight [out, r])} of a PEFT model."""
    from peft.tuners.lora import LoraLayer

    pairs = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            pairs[key] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return pairs


def lorafuse_lora_pairs(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from lorafuse.engine.lora import lora_modules

    return {name: (m.lora_A, m.lora_B) for name, m in lora_modules(model).items()}


@torch.no_grad()
def init_lora_(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int) -> None:
    """PEFT's initialisation (A kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B zeros)
    drawn from a generator seeded per module path, so every system, in any process, starts from the
    same adapters whatever order its modules were created in."""
    for name in sorted(pairs):
        lora_a, lora_b = pairs[name]
        generator = torch.Generator(device=lora_a.device)
        generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1.0 / math.sqrt(lora_a.shape[1])
        values = torch.rand(lora_a.shape, generator=generator, device=lora_a.device, dtype=torch.float32)
        lora_a.copy_((values * 2 - 1) * bound)
        lora_b.zero_()


def lora_fingerprint(pairs) -> float:
    return fingerprint([t for name in sorted(pairs) for t in pairs[name]])


# ---------------------------------------------------------------------------------------------
# Systems: one training step each, same optimizer and clipping
# ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A step's inputs, built on the host before timing (the data loader's work)."""

    micro: list
    targets: int
    useful_tokens: int
    processed_tokens: int  # what the model computes over, padding included


@dataclass
class Settings:
    model: str
    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    layers: int | None = None
    lr: float = 2e-4
    max_grad_norm: float = 1.0
    stock_batch_size: int = 4
    min_offload_bytes: int | None = None
    host_limit_bytes: int = 0  # offload arena's pinned host memory cap (0: none)


class Runner:
    """A built model with its LoRA parameters and optimizer; subclasses prepare and run a step."""

    system = "?"

    def __init__(self, settings: Settings):
        self.s = settings
        self.device = settings.device
        self.cuda = self.device.type == "cuda"
        self.model = None
        self.params: list[torch.Tensor] = []
        self.optimizer = None
        self.info: dict = {}

    def _finish_setup(self, base_model, pairs) -> None:
        init_lora_(pairs, self.s.seed)
        self.pairs = pairs
        self.params = [t for name in sorted(pairs) for t in pairs[name]]
        for p in self.params:
            p.requires_grad_(True)
        self.info.update(
            n_lora=sum(p.numel() for p in self.params), n_lora_expected=expected_lora_parameters(base_model.config),
            n_frozen=sum(p.numel() for p in base_model.parameters() if not p.requires_grad),
            lora_fingerprint=lora_fingerprint(pairs), lora_dtype=str(self.params[0].dtype).removeprefix("torch."))
        self.new_optimizer()

    def new_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self.params, lr=self.s.lr, weight_decay=0.0, betas=(0.9, 0.999),
                                           fused=self.cuda)

    def reset_adapters(self) -> None:
        """Start again from the initial adapters, with a fresh optimizer (the next case on this model)."""
        init_lora_(self.pairs, self.s.seed)
        for p in self.params:
            p.grad = None
        self.new_optimizer()

    def _update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self.cuda else t

    def prepare(self, docs) -> Prepared:
        raise NotImplementedError

    def step(self, prep: Prepared) -> torch.Tensor:
        raise NotImplementedError

    def after_failure(self) -> None:
        """Drop whatever a failed step left (gradients, offloaded inputs)."""
        for p in self.params:
            p.grad = None

    def close(self) -> None:
        self.model = self.optimizer = None
        self.params, self.pairs = [], {}


class HFRunner(Runner):
    """stock / liger / hf_packed: HF forward and loss, PEFT adapters, HF gradient checkpointing."""

    def __init__(self, settings: Settings, case: str):
        super().__init__(settings)
        from peft import LoraConfig, get_peft_model

        from lorafuse.engine.metrics import flops_per_token

        self.case = self.system = case
        self.batching = "packed" if case == "hf_packed" else "padded"
        model = build_model(settings.model, settings.device, settings.dtype, settings.seed, settings.layers)
        self.info["weights_fingerprint"] = weights_fingerprint(model)
        self.flops = flops_per_token(model, expected_lora_parameters(model.config))
        self.config = model.config
        if case == "liger":
            self.info["liger"] = apply_liger(model)
        self.info["hf_checkpointing"] = enable_hf_checkpointing(model)
        model.enable_input_require_grads()
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS),
                          bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        self.model.train()
        self._finish_setup(model, peft_lora_pairs(self.model))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if len(trainable) != len(self.params):
            raise RuntimeError(f"PEFT model has {len(trainable)} trainable tensors, expected {len(self.params)}")
        self.pad_id = 0

    def prepare(self, docs) -> Prepared:
        micro, processed = [], 0
        bs = self.s.stock_batch_size
        for start in range(0, len(docs), bs):
            group = docs[start:start + bs]
            if self.batching == "packed":
                ids = torch.from_numpy(np.concatenate([d.input_ids for d in group]))[None]
                trained = torch.from_numpy(np.concatenate([d.trained for d in group]))[None]
                positions = torch.from_numpy(np.concatenate([np.arange(len(d)) for d in group]))[None]
                labels = ids.masked_fill(~trained, IGNORE_INDEX)
                starts = np.cumsum([0] + [len(d) for d in group[:-1]])
                labels[0, torch.from_numpy(starts)] = IGNORE_INDEX  # no document predicts the next one's start
                micro.append({"input_ids": self.pin(ids), "position_ids": self.pin(positions.long()),
                              "labels": self.pin(labels)})
                processed += ids.numel()
                continue
            width = max(len(d) for d in group)
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
            for row, d in enumerate(group):
                n = len(d)
                ids[row, :n] = torch.from_numpy(d.input_ids)
                mask[row, :n] = 1
                labels[row, :n] = torch.from_numpy(np.where(d.trained, d.input_ids, IGNORE_INDEX))
            micro.append({"input_ids": self.pin(ids), "attention_mask": self.pin(mask), "labels": self.pin(labels)})
            processed += ids.numel()
        return Prepared(micro, target_tokens(docs), sum(len(d) for d in docs), processed)

    def set_case(self, case: str) -> None:
        """stock and hf_packed share one model: only the batching differs."""
        if case not in ("stock", "hf_packed") or self.case not in ("stock", "hf_packed"):
            raise ValueError(f"the {self.case} model cannot run case {case}")
        self.case = self.system = case
        self.batching = "packed" if case == "hf_packed" else "padded"

    def step(self, prep: Prepared) -> torch.Tensor:
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for batch in prep.micro:
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            # HF's loss with num_items_in_batch: summed over the micro-batch, divided by the step's targets
            out = self.model(**inputs, num_items_in_batch=prep.targets, use_cache=False)
            out.loss.backward()
            total += out.loss.detach().float()
            del out, inputs
        self._update()
        return total


def enable_hf_checkpointing(model) -> str:
    """HF's own activation checkpointing on every decoder layer, non-reentrant (the name changed in
    transformers 5.x: activation_checkpointing_enable, gradient_checkpointing_enable before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return "activation_checkpointing_enable(use_reentrant=False)"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return "gradient_checkpointing_enable(use_reentrant=False)"


def apply_liger(model) -> str:
    """Liger-Kernel's patches on this model instance (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)."""
    import liger_kernel.transformers as liger

    apply = getattr(liger, f"apply_liger_kernel_to_{model.config.model_type}")
    apply(rope=True, swiglu=True, rms_norm=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model)
    return getattr(sys.modules.get("liger_kernel"), "__version__", "?")


class LorafuseRunner(Runner):
    """lorafuse: packed micro-batch, fused kernels, the engine's forward and loss, per-layer checkpointing."""

    system = "lorafuse"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        from lorafuse.engine.config import LoraConfig
        from lorafuse.engine.lora import inject_lora
        from lorafuse.engine.metrics import flops_per_token
        from lorafuse.engine.model import sliding_window_limit, stack_projections

        model = build_model(settings.model, settings.device, settings.dtype, settings.seed, settings.layers)
        self.info["weights_fingerprint"] = weights_fingerprint(model)
        self.flops = flops_per_token(model, expected_lora_parameters(model.config))
        self.config = model.config
        if sliding_window_limit(model) is not None:
            raise RuntimeError(f"{settings.model}: sliding-window attention is not supported by lorafuse")
        stack_projections(model)
        inject_lora(model, LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=list(PROJECTIONS)))
        model.eval()  # as the engine: no HF dropout; LoRA dropout is 0
        self.model = model
        self._finish_setup(model, lorafuse_lora_pairs(model))
        self.checkpointer = None
        self.mode = "none"

    def set_mode(self, mode: str) -> None:
        from lorafuse.engine.checkpointing import LayerCheckpointer, layer_modes

        self.checkpointer = None
        gc.collect()
        self.mode = mode
        if mode != "none":
            kwargs = {"max_host_bytes": self.s.host_limit_bytes}
            if self.s.min_offload_bytes is not None:
                kwargs["min_offload_bytes"] = self.s.min_offload_bytes
            self.checkpointer = LayerCheckpointer(self.device, layer_modes(mode, self.config.num_hidden_layers),
                                                  **kwargs)
        self.case = f"lorafuse-{mode}"

    def prepare(self, docs) -> Prepared:
        from lorafuse.engine.packing import pack

        total = sum(len(d) for d in docs)
        batches = pack(docs, max(total, 1))
        if self.cuda:
            batches = [b.pin_memory() for b in batches]
        return Prepared(batches, sum(b.num_target_tokens for b in batches), total, total)

    def step(self, prep: Prepared) -> torch.Tensor:
        from lorafuse.engine.forward import packed_loss

        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for batch in prep.micro:
            batch = batch.to(self.device)
            loss = packed_loss(self.model, batch, reduction="sum", checkpointer=self.checkpointer) / prep.targets
            loss.backward()
            total += loss.detach().float()
            del loss
        self._update()
        if self.checkpointer is not None:
            self.checkpointer.end_step()
        return total

    def after_failure(self) -> None:
        super().after_failure()
        if self.checkpointer is not None:
            with contextlib.suppress(Exception):
                self.checkpointer.synchronize()
            with contextlib.suppress(Exception):
                self.checkpointer.end_step()

    def close(self) -> None:
        self.checkpointer = None
        super().close()


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


class CudaBroken(RuntimeError):
    """A CUDA error that poisons the context: nothing else can run in this process."""


_STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                       "misaligned address", "illegal instruction", "an illegal")


def _is_oom(error: BaseException) -> str | None:
    """'oom' (device memory: the caching allocator, or a library's own allocation such as cuBLAS's
    workspace), 'host' (the offload arena's host limit) or None."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "oom"
    text = str(error)
    if "arena overflow" in text:
        return "host"
    if isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text):
        return None if _is_fatal(error) else "oom"
    return None


def _is_fatal(error: BaseException) -> bool:
    """A CUDA error that leaves the context unusable: nothing else can run in this process."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(e in text for e in _STICKY_CUDA_ERRORS)


def oom_kind_or_raise(error: BaseException) -> str | None:
    """The OOM kind of a failed step ('oom' or 'host'), None for another recoverable error; a sticky
    CUDA error is raised again as CudaBroken (nothing else can run in this process)."""
    kind = _is_oom(error)
    if kind is None and _is_fatal(error):
        raise CudaBroken(f"{type(error).__name__}: {error}") from error
    return kind


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _timed_step(runner: Runner, prep: Prepared) -> tuple[float, float]:
    """(seconds, loss) of one step; CUDA events on the GPU, wall clock on the CPU."""
    if runner.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = runner.step(prep)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, float(loss)
    started = time.perf_counter()
    loss = runner.step(prep)
    return time.perf_counter() - started, float(loss)


def measure_case(runner: Runner, steps: list[list], warmup: int, peak_flops: float | None, log=print) -> dict:
    """Train len(steps) steps; the ones after `warmup` are timed. Never raises for OOM."""
    row: dict = {"oom": False, "step_losses": [], "warmup": warmup, "steps": len(steps) - warmup}
    prepared = [runner.prepare(docs) for docs in steps]
    row["useful_tokens_per_step"] = [p.useful_tokens for p in prepared]
    row["processed_tokens_per_step"] = [p.processed_tokens for p in prepared]
    row["micro_batches_per_step"] = [len(p.micro) for p in prepared]
    row["target_tokens_per_step"] = [p.targets for p in prepared]
    flops = [runner.flops([_Lengths([len(d) for d in docs])]) for docs in steps]
    times: list[float] = []
    failure = None
    base_mem = None
    try:
        for index, prep in enumerate(prepared):
            if index == warmup and runner.cuda:
                torch.cuda.synchronize(runner.device)
                torch.cuda.reset_peak_memory_stats(runner.device)
                base_mem = torch.cuda.memory_allocated(runner.device)
            seconds, loss = _timed_step(runner, prep)
            row["step_losses"].append(loss)
            if index >= warmup:
                times.append(seconds)
            log(f"  [{runner.case}] step {index + 1}/{len(prepared)}: loss {loss:.5f}, {seconds * 1e3:.0f} ms"
                + (" (warm-up)" if index < warmup else ""))
    except Exception as error:  # noqa: BLE001 - OOM is a result; anything else is recorded, then re-raised if fatal
        failure = error
    if failure is not None:
        kind = oom_kind_or_raise(failure)
        if kind is None:
            row["error"] = f"{type(failure).__name__}: {failure}"
            row["traceback"] = traceback.format_exception(failure)[-6:]
        else:
            row["oom"] = True
            row["oom_kind"] = kind
            row["oom_at_step"] = len(row["step_losses"]) + 1
        failure = None  # drop the traceback's frames (activations) before freeing memory
        runner.after_failure()
        free_memory(runner.device)
        log(f"  [{runner.case}] {'out of memory' if row['oom'] else row['error']}")
        return row

    tokens = row["useful_tokens_per_step"][warmup:]
    timed_flops = flops[warmup:]
    if times:
        # Steady state: the median step (a one-off compile or autotune in a timed step does not count);
        # every step holds the same number of useful tokens, so tokens/s is that over the median time.
        row["step_time_s"] = statistics.median(times)
        row["step_times_s"] = times
        row["tokens_per_s"] = statistics.mean(tokens) / row["step_time_s"]
        row["tokens_per_s_mean"] = sum(tokens) / sum(times)  # over the total time of the timed steps
        row["model_tflops_per_step"] = statistics.mean(timed_flops) / 1e12
        if peak_flops:
            row["mfu"] = statistics.mean(timed_flops) / row["step_time_s"] / peak_flops
            row["mfu_mean"] = sum(timed_flops) / sum(times) / peak_flops
        else:
            row["mfu"] = None
    else:
        row.update(step_time_s=None, tokens_per_s=None, mfu=None)
    row["padding_fraction"] = 1 - sum(row["useful_tokens_per_step"]) / sum(row["processed_tokens_per_step"])
    if runner.cuda:
        peak = torch.cuda.max_memory_allocated(runner.device)
        row["peak_mem_gb"] = peak / GIB
        row["mem_before_steps_gb"] = base_mem / GIB if base_mem is not None else None
    else:
        row["peak_mem_gb"] = None
    return row


def _probe_flops(runner: Runner, tokens: int) -> float:
    return runner.flops([_Lengths([tokens])])


def max_context_search(runner: Runner, vocab_size: int, *, start: int, granularity: int, limit: int,
                       deadline: float, seed: int, log=print, progress=None) -> dict:
    """The largest single document that trains one step: doubling from `start` until a step runs out of
    memory, then bisection to `granularity` tokens. A probe whose predicted time (its model FLOPs at the
    fastest rate seen so far) would pass `deadline` (time.monotonic()) is not started: the result is
    then a lower bound (limited_by "time"). progress(partial result) is called after every probe, so a
    process stopped mid-search still leaves its lower bound."""
    probes: list[dict] = []
    best_rate = None
    good, bad = 0, None

    def fits(tokens: int) -> bool:
        nonlocal best_rate
        doc = single_document(tokens, vocab_size, seed)
        prep = runner.prepare([doc])
        probe = {"tokens": tokens}
        if runner.cuda:
            torch.cuda.reset_peak_memory_stats(runner.device)
        started = time.monotonic()
        failure = None
        try:
            seconds, loss = _timed_step(runner, prep)
            probe.update(status="ok", seconds=seconds, loss=loss)
            best_rate = max(best_rate or 0.0, _probe_flops(runner, tokens) / max(seconds, 1e-9))
        except Exception as error:  # noqa: BLE001
            failure = error
        if failure is not None:
            kind = oom_kind_or_raise(failure)
            if kind is None:
                probe["status"] = f"error: {type(failure).__name__}: {str(failure)[:300]}"
            else:
                probe["status"] = "oom" if kind == "oom" else "host_limit"
            probe["seconds"] = time.monotonic() - started
            failure = None
            runner.after_failure()
        if runner.cuda:
            probe["peak_mem_gb"] = torch.cuda.max_memory_allocated(runner.device) / GIB
        del prep
        free_memory(runner.device)
        probes.append(probe)
        log(f"  [{runner.case}] max context probe {tokens} tokens: {probe['status']} ({probe['seconds']:.1f} s)")
        ok = probe["status"] == "ok"
        if progress is not None:
            progress({"largest_tokens": max(good, tokens) if ok else good,
                      "first_failure": bad if ok else tokens,
                      "limited_by": "stopped (in progress)", "granularity": granularity, "probes": probes})
        return ok

    def affordable(tokens: int) -> bool:
        if best_rate is None:
            return time.monotonic() < deadline
        return time.monotonic() + _probe_flops(runner, tokens) / best_rate < deadline

    limited_by = "limit"
    tokens = start
    while tokens <= limit:
        if not affordable(tokens):
            limited_by = "time"
            break
        if not fits(tokens):
            bad = tokens
            limited_by = "memory" if probes[-1]["status"] in ("oom", "host_limit") else "error"
            break
        good, tokens = tokens, tokens * 2
    while bad is not None and limited_by == "memory" and bad - good > granularity:
        middle = (good + bad) // 2 // granularity * granularity
        if middle <= good:
            break
        if not affordable(middle):
            limited_by = "time"
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return {"largest_tokens": good, "first_failure": bad, "limited_by": limited_by, "granularity": granularity,
            "probes": probes}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": str(device), "cuda": torch.version.cuda,
           "kernels": os.environ.get("LORAFUSE_KERNELS", "auto"),
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    for name in ("triton", "peft", "liger_kernel"):
        with contextlib.suppress(Exception):
            module = __import__(name)
            env[name] = getattr(module, "__version__", "?")
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return env


def measured_peak_flops(device: torch.device, warm_s: float = 1.0) -> float:
    """The MFU denominator: lorafuse.engine.metrics.peak_matmul_flops (bf16 8192^3 matmuls), measured after
    `warm_s` seconds of matmuls so the clocks are up (bench/run.py's env stage measures it the same way)."""
    from lorafuse.engine.metrics import peak_matmul_flops

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ends = time.monotonic() + warm_s
    while time.monotonic() < ends:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize(device)
    del a
    peak = peak_matmul_flops(device)
    free_memory(device)
    return peak


def case_available(case: str) -> str | None:
    """None if the case can run here, else why not."""
    if case == "liger":
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
    if case == "hf_packed":
        try:
            from transformers import masking_utils
        except ImportError:
            return "this transformers has no masking_utils"
        if not hasattr(masking_utils, "find_packed_sequence_indices"):
            return "this transformers does not build document masks from position_ids for SDPA"
    return None


def _save(results: dict, path: str | None) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)


def _entry(args, case: str, runner: Runner | None) -> dict:
    system, checkpointing = CASES[case]
    row = {"model": args.model, "system": system, "case": case, "checkpointing": checkpointing,
           "tokens_per_step": args.tokens_per_step, "dtype": str(args.dtype).removeprefix("torch."),
           "device": str(args.device)}
    if case in HF_CASES:
        row["stock_batch_size"] = args.stock_batch_size
    if args.layers:
        row["layers"] = args.layers
    if runner is not None:
        row.update(runner.info)
        if isinstance(runner, LorafuseRunner) and runner.checkpointer is not None:
            row["offload_backend"] = runner.checkpointer.backend
    return row


def _groups(cases: list[str]) -> list[list[str]]:
    """Cases that share one built model: stock and hf_packed (HF + PEFT, only the batching differs); the
    lorafuse modes; liger alone and last (its patches of the HF classes outlive its model)."""
    groups = [[c for c in cases if c in ("stock", "hf_packed")], [c for c in cases if c.startswith("lorafuse-")],
              [c for c in cases if c == "liger"]]
    return [g for g in groups if g]


def _plan(group: list[str], max_context: list[str]) -> list[tuple[str, str]]:
    """The order of work on one built model: training of the main cases (stock, lorafuse modes), then their
    max-context searches, then the peers' training (so a tight time budget cuts the peers first)."""
    main = [c for c in group if c not in ("hf_packed", "liger")] or group[:1]
    peers = [c for c in group if c not in main]
    return ([("train", c) for c in main] + [("context", c) for c in group if c in max_context]
            + [("train", c) for c in peers])


def run(args, log=print) -> dict:
    """Run every case of args.systems (and the max-context searches of args.max_context) on args.model."""
    started = time.monotonic()
    deadline = started + args.time_budget_s if args.time_budget_s else math.inf
    device, dtype = args.device, args.dtype
    cuda = device.type == "cuda"
    if not cuda:
        os.environ.setdefault("LORAFUSE_KERNELS", "reference")  # the interpreter would take hours
    results = {"benchmark": "e2e", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": args.command, "env": environment(device),
               "config": {"model": args.model, "tokens_per_step": args.tokens_per_step, "warmup": args.warmup,
                          "steps": args.steps, "seed": args.seed, "lr": args.lr, "lora_r": LORA_R,
                          "lora_alpha": LORA_ALPHA, "target_modules": PROJECTIONS,
                          "stock_batch_size": args.stock_batch_size, "layers": args.layers,
                          "data": vars(args.mix), "max_context_start": args.max_context_start,
                          "max_context_step": args.max_context_step, "max_context_limit": args.max_context_limit,
                          "max_context_budget_s": args.max_context_budget_s},
               "e2e": [], "max_context": [], "skipped": []}
    peak = None
    if cuda:
        peak = measured_peak_flops(device)
        results["peak_bf16_tflops"] = peak / 1e12
    _save(results, args.out)
    from lorafuse.engine.checkpointing import default_host_limit

    config = model_config(args.model, args.layers)
    steps = make_steps(args.warmup + args.steps, args.tokens_per_step, config.vocab_size, args.mix, args.seed)
    settings = Settings(model=args.model, device=device, dtype=dtype, seed=args.seed, layers=args.layers, lr=args.lr,
                        stock_batch_size=args.stock_batch_size,
                        min_offload_bytes=None if cuda else 0,
                        host_limit_bytes=default_host_limit() if cuda else 0)
    cases = [c for c in args.systems if c in CASES]
    for case in list(cases):
        why = case_available(case)
        if why:
            results["skipped"].append({"case": case, "reason": why})
            log(f"[e2e] skip {case}: {why}")
            cases.remove(case)
    broken = None
    for group in _groups(cases):
        if broken:
            for case in group:
                results["skipped"].append({"case": case, "reason": f"CUDA context lost earlier: {broken}"})
            continue
        runner = None
        try:
            log(f"[e2e] {args.model}: building for {', '.join(group)}")
            built = time.monotonic()
            runner = LorafuseRunner(settings) if group[0].startswith("lorafuse-") else HFRunner(settings, group[0])
            runner.info["build_s"] = time.monotonic() - built
            for kind, case in _plan(group, args.max_context):
                if kind == "train":
                    _train_case(args, results, runner, case, steps, peak, deadline, log)
                else:
                    _context_case(args, results, runner, case, config.vocab_size, deadline, log)
        except CudaBroken as error:
            broken = str(error)[:300]
            results.setdefault("errors", []).append({"cases": group, "error": broken})
            log(f"[e2e] {group}: CUDA error, stopping this process: {broken}")
        except Exception as error:  # noqa: BLE001 - building failed: one system failing must not lose the others
            results.setdefault("errors", []).append(
                {"cases": group, "error": f"{type(error).__name__}: {error}",
                 "traceback": traceback.format_exception(error)[-8:]})
            for case in group:
                if not any(r["case"] == case for r in results["e2e"]):
                    row = _entry(args, case, None)
                    _fail_row(row, error, log, when="building the model")
                    results["e2e"].append(row)
            error = None
        finally:
            if runner is not None:
                runner.close()
            runner = None
            free_memory(device)
        _save(results, args.out)
    results["seconds"] = time.monotonic() - started
    _save(results, args.out)
    return results


def _switch(runner: Runner, case: str) -> None:
    """Put a shared model into `case` (checkpointing mode or batching), from the initial adapters."""
    if isinstance(runner, LorafuseRunner):
        runner.set_mode(CASES[case][1])
    else:
        runner.set_case(case)
    runner.reset_adapters()


def _train_case(args, results: dict, runner: Runner, case: str, steps, peak, deadline: float, log) -> None:
    # a case is not started when the last one on this model took longer than what is left
    needed = 0.8 * runner.info.get("last_case_s", 0.0)
    if time.monotonic() + needed > deadline:
        results["skipped"].append({"case": case, "reason": f"time budget spent (needs ~{needed:.0f} s)"})
        log(f"[e2e] skip {case}: time budget spent")
        return
    case_started = time.monotonic()
    row = _entry(args, case, runner)
    try:
        _switch(runner, case)
        row = _entry(args, case, runner)
        log(f"[e2e] {case}: {args.warmup} warm-up + {args.steps} timed steps of {args.tokens_per_step} tokens")
        row.update(measure_case(runner, steps, args.warmup, peak, log))
        row["peak_flops_tflops"] = peak / 1e12 if peak else None
    except CudaBroken:
        raise
    except Exception as error:  # noqa: BLE001 - recorded; the next case still runs
        _fail_row(row, error, log)
        error = None
        runner.after_failure()
        free_memory(runner.device)
    runner.info["last_case_s"] = time.monotonic() - case_started
    row["case_s"] = runner.info["last_case_s"]
    row.pop("last_case_s", None)
    results["e2e"].append(row)
    _save(results, args.out)
    _print_row(row, log)


def _context_case(args, results: dict, runner: Runner, case: str, vocab_size: int, deadline: float, log) -> None:
    budget_end = min(deadline, time.monotonic() + args.max_context_budget_s)
    row = {k: v for k, v in _entry(args, case, runner).items() if k in _CONTEXT_KEYS}
    row.update(largest_tokens=0, first_failure=None, limited_by="stopped (in progress)", probes=[])
    results["max_context"].append(row)

    def progress(partial):
        row.update(partial)
        _save(results, args.out)

    try:
        _switch(runner, case)
        row.update({k: v for k, v in _entry(args, case, runner).items() if k in _CONTEXT_KEYS})
        log(f"[e2e] {case}: max-context search (budget {budget_end - time.monotonic():.0f} s)")
        found = max_context_search(runner, vocab_size, start=args.max_context_start,
                                   granularity=args.max_context_step, limit=args.max_context_limit,
                                   deadline=budget_end, seed=args.seed, log=log, progress=progress)
        row.update(found)
        log(f"[e2e] {case}: largest single document {found['largest_tokens']} tokens "
            f"(limited by {found['limited_by']})")
    except CudaBroken:
        raise
    except Exception as error:  # noqa: BLE001
        row.update(limited_by="error", error=f"{type(error).__name__}: {error}")
        log(f"[e2e] {case}: max-context search failed: {row['error']}")
        error = None
        runner.after_failure()
        free_memory(runner.device)
    _save(results, args.out)


_CONTEXT_KEYS = ("model", "system", "case", "checkpointing", "dtype", "device", "layers", "offload_backend")


def _fail_row(row: dict, error: BaseException, log=print, when: str = "") -> None:
    """A case that could not run: OOM (a result) or an error (a message), with the HF keys present."""
    row.update(step_losses=row.get("step_losses", []), tokens_per_s=None, step_time_s=None, peak_mem_gb=None,
               mfu=None, oom=bool(_is_oom(error)))
    if row["oom"]:
        row.setdefault("oom_at_step", 0)
        if when:
            row["note"] = f"out of memory while {when}"
    else:
        row["error"] = f"{type(error).__name__}: {error}" + (f" (while {when})" if when else "")
        row["traceback"] = traceback.format_exception(error)[-6:]
    log(f"[e2e] {row['case']}: {'out of memory' if row['oom'] else row['error']}")


def _print_row(row: dict, log=print) -> None:
    if row.get("oom"):
        log(f"[e2e] {row['case']}: OOM at step {row.get('oom_at_step')}")
        return
    if row.get("error"):
        log(f"[e2e] {row['case']}: error {row['error']}")
        return
    parts = [f"{row['tokens_per_s']:.0f} tok/s", f"step {row['step_time_s'] * 1e3:.0f} ms"]
    if row.get("peak_mem_gb") is not None:
        parts.append(f"peak {row['peak_mem_gb']:.2f} GiB")
    if row.get("mfu") is not None:
        parts.append(f"MFU {row['mfu']:.1%}")
    parts.append("losses " + ", ".join(f"{x:.4f}" for x in row["step_losses"][:3]))
    log(f"[e2e] {row['case']}: " + ", ".join(parts))


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
