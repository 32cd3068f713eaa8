"""The HF + PEFT systems of the end-to-end benchmark: stock (padded micro-batches), hf_packed (the same
model without padding), hf_patched (the stock step on the same model under lorafuse.patch: what a
transformers Trainer step becomes with one line) and liger (Liger-Kernel's patches), each with HF's forward
and loss, PEFT adapters and HF gradient checkpointing."""

from __future__ import annotations

import sys

import numpy as np
import torch

from e2e_adapters import weights_fingerprint
from e2e_data import target_tokens
from e2e_lorafuse_runner import model_flops
from e2e_models import LORA_ALPHA, LORA_R, PROJECTIONS, build_model
from e2e_runner import Prepared, Runner, Settings

IGNORE_INDEX = -100
SHARED = ("stock", "hf_packed", "hf_patched")  # cases of one built model


def peft_lora_pairs(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path in the HF model: (lora_A weight [r, in], lora_B weight [out, r])} of a PEFT model."""
    from peft.tuners.lora import LoraLayer

    pairs = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            pairs[key] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return pairs


class HFRunner(Runner):
    """stock / liger / hf_packed / hf_patched: HF forward and loss, PEFT adapters, HF gradient checkpointing."""

    def __init__(self, settings: Settings, case: str):
        super().__init__(settings)
        from peft import LoraConfig, get_peft_model

        self.case = self.system = "stock" if case in SHARED else case
        self.batching = "padded"
        model = build_model(settings.model, settings.device, settings.dtype, settings.seed, settings.layers)
        self.info["weights_fingerprint"] = weights_fingerprint(model)
        self.flops = model_flops(model)
        self.config = model.config
        n_frozen = sum(p.numel() for p in model.parameters())
        if case == "liger":
            self.info["liger"] = apply_liger(model)
        if case == "qlora-peft":
            self.info["bitsandbytes"] = quantize_with_bitsandbytes(model, settings.dtype)
        self.info["hf_checkpointing"] = enable_hf_checkpointing(model)
        model.enable_input_require_grads()
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS),
                          bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        self.model.train()
        self._finish_setup(model, peft_lora_pairs(self.model))
        self.info["n_frozen"] = n_frozen  # before quantization: bitsandbytes packs two values per uint8 parameter
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if len(trainable) != len(self.params):
            raise RuntimeError(f"PEFT model has {len(trainable)} trainable tensors, expected {len(self.params)}")
        self.pad_id = 0
        if case in SHARED:
            self.set_case(case)

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
        useful = sum(len(d) for d in docs)
        if self.case == "hf_patched":  # the same padded batches; the patched forward skips the padding
            processed = useful
        return Prepared(micro, target_tokens(docs), useful, processed)

    def set_case(self, case: str) -> None:
        """stock, hf_packed and hf_patched share one model: the batching differs, and hf_patched runs the same
        padded batches with the model under lorafuse.patch (its forward on our kernels, HF's gradient
        checkpointing as our per-layer recompute)."""
        if case == self.case and case not in SHARED:  # a model of its own (liger, qlora-peft): nothing to switch
            return
        if case not in SHARED or self.case not in SHARED:
            raise ValueError(f"the {self.case} model cannot run case {case}")
        import lorafuse

        if case == "hf_patched":
            lorafuse.patch(self.model)
            self.info["patched"] = True
        else:
            lorafuse.unpatch(self.model)
            self.info.pop("patched", None)
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


def quantize_with_bitsandbytes(model, dtype) -> str:
    """PEFT + bitsandbytes QLoRA as its recipe builds it: every projection of PROJECTIONS a bitsandbytes Linear4bit
    (NF4, double quantization, blocksize 64, compute in `dtype`), quantized from this model's own weights on its
    device; returns bitsandbytes' version. Imported only here: bitsandbytes is a peer, never a dependency."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in PROJECTIONS or not isinstance(module, torch.nn.Linear):
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=64)
        if module.bias is not None:
            layer.bias = module.bias
        layer = layer.to(module.weight.device)  # quantizes
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)
    return getattr(bnb, "__version__", "?")


def apply_liger(model) -> str:
    """Liger-Kernel's patches on this model instance (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)."""
    import liger_kernel.transformers as liger

    apply = getattr(liger, f"apply_liger_kernel_to_{model.config.model_type}")
    apply(rope=True, swiglu=True, rms_norm=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model)
    return getattr(sys.modules.get("liger_kernel"), "__version__", "?")
