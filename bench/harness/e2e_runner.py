"""What every system of the end-to-end benchmark shares: its settings, a step's prepared inputs, and the
Runner base class (LoRA parameters, AdamW, clipping, a reset to the initial adapters). The subclasses
build the model and prepare and run one step: e2e_hf_runner.py, e2e_lorafuse_runner.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from e2e_adapters import init_lora_, lora_fingerprint
from e2e_models import expected_lora_parameters


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

    def step(self, prep: Prepared) -> torch.Tensor | float:
        """One optimizer step; returns its loss (mean per target token)."""
        raise NotImplementedError

    def after_failure(self) -> None:
        """Drop whatever a failed step left (gradients, offloaded inputs)."""
        for p in self.params:
            p.grad = None

    def close(self) -> None:
        self.model = self.optimizer = None
        self.params, self.pairs = [], {}
