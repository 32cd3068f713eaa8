"""The lorafuse system of the end-to-end benchmark (one packed micro-batch per step, the fused kernels,
the engine's forward and loss, per-layer checkpointing none / recompute / offload), and every other call
the e2e benchmark makes into lorafuse.engine but the Document of e2e_data.py and the matmul peak of
gpu_peak.py: the engine's API is changing, so what follows it lives here. The engine is imported inside
the functions that call it, as before: a process that runs only HF systems loads no more of it than it did."""

from __future__ import annotations

import contextlib
import gc

import torch

from e2e_adapters import weights_fingerprint
from e2e_models import LORA_ALPHA, LORA_R, PROJECTIONS, build_model, expected_lora_parameters
from e2e_runner import Prepared, Runner, Settings


def model_flops(model):
    """DESIGN.md's model FLOPs of a step, as a function of its document lengths, on this model with its
    LoRA, counted by the engine for every system alike (lorafuse.engine.metrics)."""
    from lorafuse.engine.metrics import model_training_flops

    n_lora = expected_lora_parameters(model.config)
    return lambda doc_lengths: model_training_flops(model, n_lora, doc_lengths)


def offload_host_limit(cuda: bool) -> int:
    """The offload arena's pinned host memory cap: the engine's default on a GPU, none (0) on the CPU."""
    if not cuda:
        return 0
    from lorafuse.engine.activations import default_host_limit

    return default_host_limit()


def lorafuse_lora_pairs(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from lorafuse.engine.lora import lora_modules

    return {name: (m.lora_A, m.lora_B) for name, m in lora_modules(model).items()}


class LorafuseRunner(Runner):
    """lorafuse: packed micro-batch, fused kernels, the engine's forward and loss, per-layer checkpointing."""

    system = "lorafuse"

    def __init__(self, settings: Settings, quantize: str = "none"):
        super().__init__(settings)
        from lorafuse.engine.config import LoraConfig
        from lorafuse.engine.lora import inject_lora
        from lorafuse.engine.prepare import prepare_model

        model = build_model(settings.model, settings.device, settings.dtype, settings.seed, settings.layers)
        self.info["weights_fingerprint"] = weights_fingerprint(model)
        self.flops = model_flops(model)
        self.config = model.config
        self.quantize = quantize
        n_frozen = sum(p.numel() for p in model.parameters())
        if quantize == "nf4":  # QLoRA: the projections in NF4, quantized from the same bf16 weights
            from lorafuse.engine.quantize import frozen_weight_bytes, quantize_model

            quantize_model(model)
            self.info.update(quantize="nf4", frozen_weight_bytes=frozen_weight_bytes(model))
        self.prepared = prepare_model(model)
        inject_lora(model, LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=list(PROJECTIONS)))
        model.eval()  # as the engine: no HF dropout; LoRA dropout is 0
        self.model = model
        self._finish_setup(model, lorafuse_lora_pairs(model))
        self.info["n_frozen"] = n_frozen  # NF4 weights are buffers: count their values as the dense model's
        self.checkpointer = None
        self.mode = "none"

    def set_mode(self, mode: str) -> None:
        from lorafuse.engine.activations import LayerCheckpointer, layer_modes

        self.checkpointer = None
        gc.collect()
        self.mode = mode
        if mode != "none":
            kwargs = {"max_host_bytes": self.s.host_limit_bytes}
            if self.s.min_offload_bytes is not None:
                kwargs["min_offload_bytes"] = self.s.min_offload_bytes
            self.checkpointer = LayerCheckpointer(self.device, layer_modes(mode, self.config.num_hidden_layers),
                                                  **kwargs)
        self.case = "qlora-lorafuse" if self.quantize == "nf4" else f"lorafuse-{mode}"

    def prepare(self, docs) -> Prepared:
        from lorafuse.engine.packing import pack

        total = sum(len(d) for d in docs)
        batches = pack(docs, max(total, 1))
        if self.cuda:
            batches = [b.pin_memory() for b in batches]
        return Prepared(batches, sum(b.num_target_tokens for b in batches), total, total)

    def step(self, prep: Prepared) -> float:
        """The engine's own training step (lorafuse.engine.step.train_step), as `lorafuse train` runs it."""
        from lorafuse.engine.step import train_step

        return train_step(self.prepared, prep.micro, self.optimizer, self.params, max_grad_norm=self.s.max_grad_norm,
                          checkpointer=self.checkpointer).loss

    def after_failure(self) -> None:
        super().after_failure()
        if self.checkpointer is not None:
            with contextlib.suppress(Exception):
                self.checkpointer.synchronize()
            with contextlib.suppress(Exception):
                self.checkpointer.end_step()

    def close(self) -> None:
        self.checkpointer = self.prepared = None
        super().close()
