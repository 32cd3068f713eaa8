"""The LoRA GEMM path of a training run: which one (train.lora_gemm, LORAFUSE_LORA_GEMM) and, for the cuBLAS
path (kernels/lora_cublas.py), the [W | B] buffers and the decoder layer that uses them.

Per decoder layer, with the group's adapters stacked (A [R, K], block-diagonal B [N, R], s per rank column):
  q, k, v   = [x_hat | U] [W_qkv | B_qkv]^T          x_hat, U = rms_norm_lowrank(h)   (one pass over h)
  o         = o W_o^T + (s o A_o^T) B_o^T             (attention output from outside: skinny GEMM + addmm)
  g, u      = [x_hat | U] [W_gu | B_gu]^T             x_hat, U = rms_norm_lowrank(h)
  mlp out   = [h | U_d] [W_d | B_d]^T                 h, U_d = glu_lowrank(g, u)          (one pass over g, u)
Backward is autograd over those Functions: each GEMM's dY [W | B] = [dX_base | V] goes to the producer of
[x | U], which adds V diag(s) A where it reads the row anyway; dA, dB arrive in float32 on the masters.

The [W | B] buffers. Each group's buffer [N, K + R] holds the frozen weight in its first K columns and the
adapters' B (block-diagonal, zeros off the blocks) in the last R, in the weight's dtype. It is written once,
when the adapters exist: train.py calls `attach` right after it injects LoRA (prepare_model runs before
that, when the ranks are unknown); other callers get them at the first forward. From then on the stacked
weight and every projection's weight are views of its first K columns (as prepare.py's stacking makes them
views of the stack), so the frozen weight is held once. The B columns are refreshed from the float32
masters by `refresh`, which step.train_step calls right after optimizer.step(). As a safety net, a forward
compares each master's version counter with the one it had at the last refresh and refreshes first when
they differ (guard.py's restore, a resumed checkpoint, load_adapter_weights all write the masters in
place), so stale B columns are never read.

Where this path does not run, a layer takes forward.decoder_layer (the Triton kernels): LoRA dropout > 0
while training (the low-rank branch then sees another input than the base), q/k/v or gate/up not stacked
(Phi-3's fused projections, mixed biases), biased gate/up/down, norm weights that train, NF4 weights.
FSDP (train.parallel: fsdp) and NF4 (quantize: nf4) are refused with lora_gemm: cublas (config.py) and
resolve to triton under auto: the buffers would have to be the sharded parameters or dense copies of the
4-bit weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafuse.kernels import _lora_gemm_select as select
from lorafuse.kernels._launch import count
from lorafuse.kernels.lora_cublas import (
    AugmentedLinearFunction,
    CublasLoraFunction,
    register_augmented,
)
from lorafuse.kernels.lora_linear import _Plan, _scale_vector
from lorafuse.kernels.nf4 import is_nf4
from lorafuse.kernels.rms_norm_lora import rms_norm_lowrank
from lorafuse.kernels.swiglu_lora import glu_lowrank

from .lora import active_adapter, fusable


def model_shapes(spec) -> list[tuple[int, int]]:
    """(K, N) of a decoder layer's four GEMMs: q/k/v stacked, o, gate/up stacked, down."""
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]


def resolve(setting: str, device: torch.device, spec, *, quantized: bool = False, kernels: str = "auto",
            ) -> tuple[str, str]:
    """(path, the sentence the training log opens with). setting: train.lora_gemm; when it is auto,
    LORAFUSE_LORA_GEMM decides, and when that is auto too, the measurement or the estimate."""
    if setting not in select.PATHS:
        raise ValueError(f"train.lora_gemm must be one of {', '.join(select.PATHS)}; got {setting!r}")
    source = "train.lora_gemm"
    if setting == "auto":
        setting, source = select.env_setting(), "LORAFUSE_LORA_GEMM"
    if setting == "cublas":
        clash = "NF4 weights (quantize: nf4)" if quantized else \
            "the reference ops (train.kernels: reference)" if kernels == "reference" else None
        if clash and source == "train.lora_gemm":  # asked for in the config: refused (config.py says it first)
            raise ValueError(f"train.lora_gemm=cublas does not combine with {clash}: use triton or auto")
        if clash:  # the environment's preference yields to what this model or run needs, as per call
            return "triton", f"triton ({clash} take the Triton path; LORAFUSE_LORA_GEMM=cublas does not apply)"
        return "cublas", f"cublas ({source})"
    if setting == "triton":
        return "triton", f"triton ({source})"
    if kernels == "reference":
        return "triton", "reference ops (train.kernels: reference)"
    if quantized:
        return "triton", "triton (auto: NF4 weights take the Triton GEMMs, which dequantize them)"
    if device.type == "meta":  # sharded_load prepares the model before FSDP places its shards
        return "triton", "triton (auto: FSDP shards take the Triton GEMMs)"
    if device.type != "cuda":
        return "triton", f"triton (auto on {device.type}: today's kernels; lora_gemm: cublas runs the cuBLAS path)"
    gpu = torch.cuda.get_device_name(device)
    measured = select.measured_choice(gpu, model_shapes(spec))
    if measured is not None:
        return measured, f"{measured} (auto: measured faster on {gpu}, {select.choice_file()})"
    return select.ESTIMATE_FAVOURS, (f"{select.ESTIMATE_FAVOURS} (auto: no measurement for {gpu} at this model's "
                                     f"shapes in {select.choice_file()}; the roofline estimate in bench/README.md "
                                     "favours it; bench/kernels/bench_lora_linear.py measures)")


@dataclass
class Augmented:
    """One GEMM's [W | B] buffer (None when no projection of it has an adapter) and what refreshes it."""

    weight: torch.Tensor  # the tensor the GEMM is called with: the stack, or the projection's own weight
    wb: torch.Tensor | None
    plan: _Plan
    projs: tuple
    versions: tuple = ()

    def masters(self) -> list:
        return [active_adapter(p) for p in self.projs]


class LoraGemm:
    """A run's choice of LoRA GEMM path, held by the PreparedModel; with path cublas, its [W | B] buffers."""

    def __init__(self, path: str, note: str):
        self.path, self.note = path, note
        self._groups: dict = {}

    @property
    def active(self) -> bool:
        return self.path == "cublas"

    # ---- selection of the public kernel calls (the layers that take forward.decoder_layer)

    def wrap_ops(self, ops):
        """ops whose lora_linear / lora_linear_group / lora_mlp take this run's path, whatever the environment."""
        import dataclasses

        if ops.name == "reference":
            return ops

        def pinned(fn):
            def call(*args, **kwargs):
                with select.forced_path(self.path):
                    return fn(*args, **kwargs)
            return call

        return dataclasses.replace(ops, lora_linear=pinned(ops.lora_linear),
                                   lora_linear_group=pinned(ops.lora_linear_group), lora_mlp=pinned(ops.lora_mlp))

    # ---- the buffers

    def runs(self, layer) -> bool:
        """Whether this layer takes the cuBLAS decoder layer below (module docstring)."""
        if not self.active or layer.qkv is None or layer.gate_up is None or layer.gate_up.bias is not None:
            return False
        attn, mlp = layer.module.self_attn, layer.module.mlp
        projs = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if mlp.down_proj.bias is not None or not all(map(fusable, projs)):
            return False
        weights = (layer.qkv.weight, layer.gate_up.weight, attn.o_proj.weight, mlp.down_proj.weight)
        norms = [getattr(layer.module, n, None) for n in ("input_layernorm", "post_attention_layernorm",
                                                          "pre_feedforward_layernorm")]
        if any(n is not None and n.weight.requires_grad for n in norms):
            return False  # the producer's norm weight is frozen (kernels/rms_norm_lora.py)
        return not any(is_nf4(w) or w.requires_grad for w in weights)

    def group(self, key, weight: torch.Tensor, projs: tuple) -> Augmented:
        """The [W | B] buffer of `weight` (a stack of projs' weights, or one projection's), built on first use."""
        aug = self._groups.get(key)
        if aug is None or aug.weight is not weight:
            aug = self._build(weight, projs)
            self._groups[key] = aug
        ranks = tuple(a[0].shape[0] if a is not None else 0 for a in aug.masters())
        if ranks != aug.plan.ranks:  # an adapter turned on or off: a buffer for the new ranks
            aug = self._groups[key] = self._build(weight, projs)
        if aug.wb is not None and aug.versions != self._versions(aug):
            self._refresh(aug)
        return aug

    def _build(self, weight, projs) -> Augmented:
        adapters = [active_adapter(p) for p in projs]
        plan = _Plan.make(tuple(p.out_features for p in projs), tuple(a[0].shape[0] if a else 0 for a in adapters),
                          tuple(float(a[2]) if a else 0.0 for a in adapters))
        R = sum(plan.ranks)
        old = getattr(weight, "_lorafuse_wb", None)
        if R == 0 or (old is not None and old.shape[1] == weight.shape[1] + R):
            wb = old if R else None
            return Augmented(weight, wb, plan, tuple(projs))
        N, K = weight.shape
        with torch.no_grad():
            wb = torch.zeros((N, K + R), dtype=weight.dtype, device=weight.device)
            wb[:, :K].copy_(weight)
        # the same tensor objects, now views of the buffer (the old storage is freed): whoever holds them
        # (the stack, the projections, a PEFT base_layer) reads the weight from there
        weight.data = wb[:, :K]
        if len(projs) > 1 or getattr(projs[0], "base_layer", projs[0]).weight is not weight:
            for p, off, n in zip(projs, plan.offsets, plan.splits, strict=True):
                getattr(p, "base_layer", p).weight.data = wb[off:off + n, :K]
        register_augmented(weight, wb)
        aug = Augmented(weight, wb, plan, tuple(projs))
        self._refresh(aug)
        return aug

    @staticmethod
    def _versions(aug: Augmented) -> tuple:
        return tuple(a[1]._version if a is not None else -1 for a in aug.masters())

    def _refresh(self, aug: Augmented) -> None:
        K = aug.weight.shape[1]
        with torch.no_grad():
            for a, off, n, r_off, r in zip(aug.masters(), aug.plan.offsets, aug.plan.splits, aug.plan.r_offsets,
                                           aug.plan.ranks, strict=True):
                if r:
                    aug.wb[off:off + n, K + r_off:K + r_off + r].copy_(a[1])
        aug.versions = self._versions(aug)

    def attach(self, prepared) -> int:
        """Build the [W | B] buffers of every layer this path runs, now (train.py, once the adapters exist and
        before the first step), instead of at the first forward. Returns how many."""
        for layer in prepared.layers:
            if self.runs(layer):
                attn, mlp = layer.module.self_attn, layer.module.mlp
                lid = id(layer)
                self.group((lid, "qkv"), layer.qkv.weight, (attn.q_proj, attn.k_proj, attn.v_proj))
                self.group((lid, "o"), attn.o_proj.weight, (attn.o_proj,))
                self.group((lid, "gate_up"), layer.gate_up.weight, (mlp.gate_proj, mlp.up_proj))
                self.group((lid, "down"), mlp.down_proj.weight, (mlp.down_proj,))
        return len(self.buffers())

    def refresh(self) -> None:
        """Copy every B master into its [W | B] buffer (step.train_step, after optimizer.step())."""
        for aug in self._groups.values():
            if aug.wb is not None:
                self._refresh(aug)

    def buffers(self) -> dict:
        """{key: [W | B] buffer} (tests read them)."""
        return {k: a.wb for k, a in self._groups.items() if a.wb is not None}

    # ---- the decoder layer

    def _produce(self, hidden, norm_weight, aug: Augmented, spec):
        """(x_hat, U) of the group's input from the layer's hidden state, by the RMSNorm producer."""
        adapters = [a for a in aug.masters() if a is not None]
        a_stack = None
        if adapters:
            a_stack = torch.cat([a[0] for a in adapters]) if len(adapters) > 1 else adapters[0][0]
        scale = _scale_vector([r for r in aug.plan.ranks if r], [s for r, s in zip(aug.plan.ranks, aug.plan.scalings)
                                                                 if r], hidden.device) if adapters else None
        return rms_norm_lowrank(hidden, norm_weight, spec.eps, spec.family.norm_offset, a_stack, scale)

    @staticmethod
    def _bs(aug: Augmented) -> list:
        return [a[1] if a is not None else None for a in aug.masters()]

    def _o_proj(self, out, o_proj, key):
        aug = self.group(key, o_proj.weight, (o_proj,))
        adapter = active_adapter(o_proj)
        if adapter is None:
            return F.linear(out, o_proj.weight, o_proj.bias)
        return CublasLoraFunction.apply(out, o_proj.weight, o_proj.bias, aug.plan, adapter[0], adapter[1])

    def decoder_layer(self, hidden, layer, batch, prepared):
        from .forward import attention_block

        count("lora_gemm_layer")  # tests prove with it that a run took this layer
        module, spec, ops = layer.module, prepared.spec, prepared.ops
        attn, mlp = module.self_attn, module.mlp
        lid = id(layer)
        aug = self.group((lid, "qkv"), layer.qkv.weight, (attn.q_proj, attn.k_proj, attn.v_proj))
        x, u = self._produce(hidden, module.input_layernorm.weight, aug, spec)
        qkv = AugmentedLinearFunction.apply(x, u, layer.qkv.weight, layer.qkv.bias, aug.plan, *self._bs(aug))
        attended = attention_block(None, layer, batch, prepared, qkv=qkv,
                                   project=lambda out: self._o_proj(out, attn.o_proj, (lid, "o")))
        norm = lambda t, weight: ops.rms_norm(t, weight, spec.eps, spec.family.norm_offset)  # noqa: E731
        if spec.family.sandwich_norms:  # Gemma 2/3
            hidden = hidden + norm(attended, module.post_attention_layernorm.weight)
            mlp_norm = module.pre_feedforward_layernorm.weight
        else:
            hidden = hidden + attended
            mlp_norm = module.post_attention_layernorm.weight
        aug = self.group((lid, "gate_up"), layer.gate_up.weight, (mlp.gate_proj, mlp.up_proj))
        x, u = self._produce(hidden, mlp_norm, aug, spec)
        g, up = AugmentedLinearFunction.apply(x, u, layer.gate_up.weight, None, aug.plan, *self._bs(aug))
        down = mlp.down_proj
        aug = self.group((lid, "down"), down.weight, (down,))
        adapter = active_adapter(down)
        h, ud = glu_lowrank(g, up, adapter[0] if adapter is not None else None,
                            adapter[2] if adapter is not None else 0.0, spec.activation)
        mixed = AugmentedLinearFunction.apply(h, ud, down.weight, None, aug.plan, *self._bs(aug))
        if spec.family.sandwich_norms:
            return hidden + norm(mixed, module.post_feedforward_layernorm.weight)
        return hidden + mixed


def lora_gemm_for(model, setting: str, device: torch.device, spec, kernels: str) -> LoraGemm:
    quantized = any(is_nf4(getattr(m, "weight", None)) for m in model.modules())
    if os.environ.get("LORAFUSE_KERNELS") == "reference" and setting == "auto":
        kernels = "reference"
    return LoraGemm(*resolve(setting, device, spec, quantized=quantized, kernels=kernels))
