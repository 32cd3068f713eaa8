"""lorafuse.patch: a transformers causal LM (with or without PEFT LoRA) whose training forward runs on
lorafuse's kernels, under HF's Trainer, TRL's SFTTrainer or a loop of your own.

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(...))
    lorafuse.patch(model)            # model(input_ids=..., attention_mask=..., labels=...) now runs ours
    ...
    lorafuse.unpatch(model)          # HF's forward back, the weights as they were

How. The patch builds the engine's PreparedModel over the HF model (prepare.py) and routes a
training-style call to the engine's own forward (forward.py): the same decoder, the same LoRA path
(lora.py, which reads a PEFT LoRA layer's lora_A / lora_B / scaling / dropout in place: peft_lora.py).
It plants one attribute on each of two HF modules, `forward` on the causal LM and on its backbone
(`model.model`), and nothing else:
  causal LM, with labels      the fused linear cross-entropy over the packed tokens: `loss` only,
                              `logits` is None (as Liger-Kernel does); `num_items_in_batch` honoured
  backbone                    `last_hidden_state` [B, S, H] (zeros at padding), for HF's own head
                              (a call without labels) or TRL's fused log-prob head
The inputs (padded, padding-free, cu_seq_lens_*) become one packed batch (hf_batch.py). A call with a
cache (past_key_values / cache, use_cache=True: generation), inputs_embeds, output_attentions /
output_hidden_states or a keyword we do not know goes to the forward that was there before, unchanged.

The frozen q/k/v and gate/up weights are stacked (views of one tensor per layer; the Parameter objects
stay the same), and restacked on the next call whenever something replaced them (`model.to(...)`, a
safe merge); so are the active adapters' lora_A and lora_B of those projections (the kernels then read
them in place; adapters replaced later are copied per call instead). `unpatch` gives each its own storage
back.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings

import torch
import torch.nn as nn

from .forward import packed_hidden_states, packed_loss
from .hf_batch import packed_from_hf
from .lora import LoraLinear, stack_adapter_storage
from .peft_lora import is_peft_lora, unsupported_reason
from .prepare import STACKED_GROUPS, DecoderSpec, PreparedModel, prepare_model

PATCH_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
# keywords a routed call understands (values of the others must be None); cu_seq_lens_k must equal _q
BACKBONE_KEYS = {"input_ids", "attention_mask", "position_ids", "use_cache", "past_key_values", "cache",
                 "cache_position", "inputs_embeds", "output_attentions", "output_hidden_states", "return_dict",
                 "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}
LM_KEYS = BACKBONE_KEYS | {"labels", "shift_labels", "num_items_in_batch", "logits_to_keep"}


class PatchError(ValueError):
    """The model cannot be patched; the message names the module or config key."""


def patch(model, *, attention: str = "auto", kernels: str = "auto"):
    """Make `model`'s training forward run on lorafuse's kernels; returns `model`.

    `model`: a transformers causal LM of a supported family (llama, mistral, qwen2, qwen3), or a PEFT
    model over one (get_peft_model / PeftModel.from_pretrained) with plain LoRA on the decoder's
    projections. A call with labels (HF's convention: unshifted, -100 ignored; the sum over the batch
    divided by `num_items_in_batch` when given, else the mean) returns the loss and `logits=None`, as
    Liger-Kernel's fused loss does: the fused cross-entropy never materialises the logits (call without
    labels for logits). Padding positions are skipped, not computed, and are no target. A routed call
    returns no cache; generation (use_cache=True, a cache) runs HF's forward, unchanged.
    attention / kernels: as train.attention / train.kernels.

    Refused (PatchError naming the module or key): another architecture, LoRA on embeddings or lm_head,
    PEFT modules_to_save or trainable tokens on modules lorafuse computes, DoRA and other LoRA variants,
    lora_bias, several active adapters, quantized weights. LoRA dropout > 0 runs unfused PyTorch ops.
    """
    lm = causal_lm(model)
    if find_patch(lm) is not None:
        return model
    check_patchable(lm)
    _Patch(lm, attention, kernels)
    return model


def unpatch(model):
    """Undo `patch`: HF's forwards back, each stacked weight in its own storage again; returns `model`."""
    lm = causal_lm(model)
    state = find_patch(lm)
    if state is not None:
        state.remove()
    return model


def is_patched(model) -> bool:
    return find_patch(causal_lm(model)) is not None


def causal_lm(model):
    """The transformers causal LM inside `model` (itself, or under a PeftModel / LoraModel)."""
    seen = model
    for _ in range(4):
        if not type(seen).__module__.startswith("peft.") and hasattr(seen, "lm_head"):  # PEFT forwards lm_head
            return seen
        seen = seen.get_base_model() if hasattr(seen, "get_base_model") else getattr(seen, "model", None)
    raise PatchError(f"lorafuse.patch: {type(model).__name__} is not a transformers causal LM (no lm_head) "
                     "nor a PEFT model over one")


def find_patch(lm) -> _Patch | None:
    for module in (lm, getattr(lm, "model", None)):
        fn = vars(module).get("forward") if module is not None else None
        while fn is not None:
            if isinstance(getattr(fn, "lorafuse_patch", None), _Patch):
                return fn.lorafuse_patch
            fn = getattr(fn, "__wrapped__", None)
    return None


def check_patchable(lm) -> None:
    """PatchError naming what lorafuse's forward could not compute exactly as HF / PEFT do."""
    config = lm.config
    try:
        DecoderSpec.from_config(config)
    except ValueError as e:
        raise PatchError(f"lorafuse.patch: {e}") from None
    if config.model_type not in PATCH_FAMILIES:  # tested against HF + PEFT under Trainer/TRL for these so far
        raise PatchError(f"lorafuse.patch: model_type {config.model_type!r} is trained by `lorafuse train` but not "
                         f"patched yet; lorafuse.patch takes {', '.join(PATCH_FAMILIES)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise PatchError(f"lorafuse.patch: config hidden_act {config.hidden_act!r} is not supported (SwiGLU: silu)")
    if getattr(config, "attention_dropout", 0.0):
        raise PatchError(f"lorafuse.patch: config attention_dropout={config.attention_dropout} is not implemented")
    quant = getattr(config, "quantization_config", None) or getattr(lm, "hf_quantizer", None)
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise PatchError(f"lorafuse.patch: the model is quantized ({method}); lorafuse runs floating-point weights")
    for name, module in lm.named_modules():
        peft_made = type(module).__module__.startswith("peft.")
        if PROJECTION.fullmatch(name):
            why = _projection_problem(module)
        elif is_peft_lora(module):
            what = "lm_head (the fused loss reads the head weight)" if name.endswith("lm_head") else \
                "embeddings" if "embed" in name else "this module"
            why = f"has LoRA; lorafuse supports LoRA on the decoder projections only, not on {what}"
        elif peft_made:
            why = (f"is PEFT's {type(module).__name__} (modules_to_save, trainable tokens or another tuner), "
                   "but lorafuse computes this module itself")
        else:
            continue
        if why:
            raise PatchError(f"lorafuse.patch: {name} {why}")


def _projection_problem(proj) -> str | None:
    if is_peft_lora(proj):
        return unsupported_reason(proj)
    if isinstance(proj, LoraLinear) or (type(proj) is nn.Linear and proj.weight.dtype.is_floating_point):
        return None
    kind = f"{type(proj).__module__}.{type(proj).__name__}"
    return f"is a {kind}, not an nn.Linear or a PEFT LoRA layer (quantized, or another PEFT tuner)"


def _base(proj) -> nn.Module:
    return getattr(proj, "base_layer", proj)


def _shared(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _Patch:
    """One patched causal LM: its PreparedModel (rebuilt when the weights move) and the forwards it replaced."""

    def __init__(self, lm, attention: str, kernels: str):
        self.lm, self.backbone = lm, lm.model
        self.attention, self.kernels = attention, kernels
        projections = [getattr(getattr(layer, block), n) for layer in self.backbone.layers
                       for block, names in STACKED_GROUPS.items() for n in names]
        # frozen base weights only: a stacked copy is not a parameter, so it could not train
        self.stack = not any(_base(p).weight.requires_grad for p in projections)
        self.prepared = self._prepare()
        self.checkpointer = None
        self.active = True
        self.planted = []
        self.warned: set = set()
        self._plant(self.backbone, self._backbone_forward, BACKBONE_KEYS)
        self._plant(lm, self._lm_forward, LM_KEYS)

    # ---- the PreparedModel, kept in step with the weights

    def _prepare(self) -> PreparedModel:
        # each layer's q/k/v and gate/up adapters in one buffer too: the grouped kernels read them in place
        self.adapter_views = stack_adapter_storage(self.lm)
        return prepare_model(self.lm, attention=self.attention, kernels=self.kernels, stack_projections=self.stack)

    def _stacked_weights(self, prepared: PreparedModel):
        """(projection's base layer, its stack) for every stacked projection."""
        for layer in prepared.layers:
            for stacked, (block, names) in zip((layer.qkv, layer.gate_up), STACKED_GROUPS.items()):
                if stacked is not None:
                    for n in names:
                        yield _base(getattr(getattr(layer.module, block), n)), stacked

    def current(self) -> PreparedModel:
        """The PreparedModel, rebuilt when the model moved or a stacked weight was replaced."""
        device = self.backbone.embed_tokens.weight.device
        if self.prepared.device != device or not all(
                _shared(base.weight, stacked.weight) for base, stacked in self._stacked_weights(self.prepared)):
            self.prepared = self._prepare()
            self.checkpointer = None
        return self.prepared

    def _checkpointer(self, prepared: PreparedModel):
        """With HF gradient checkpointing on (Trainer's gradient_checkpointing=True), our per-layer checkpointer
        takes the place of HF's: each layer HF would checkpoint is recomputed in backward."""
        modes = ["recompute" if getattr(layer, "gradient_checkpointing", False) else "none"
                 for layer in self.backbone.layers]
        if "recompute" not in modes or not (self.backbone.training and torch.is_grad_enabled()):
            return None
        if self.checkpointer is None:
            from .activations import LayerCheckpointer

            self.checkpointer = LayerCheckpointer(prepared.device, modes)
        elif self.checkpointer.modes != modes:
            self.checkpointer.set_modes(modes)
        return self.checkpointer

    # ---- the routed forwards

    def _batch(self, call: dict):
        batch, index = packed_from_hf(call["input_ids"], call.get("attention_mask"), call.get("position_ids"),
                                      call.get("cu_seq_lens_q"), call.get("labels"), call.get("shift_labels"))
        if batch.num_tokens == 0:  # nothing but padding: HF's forward gives the shapes it always gives
            return None, None, None
        prepared = self.current()
        return prepared, batch.to(prepared.device), index

    def _lm_forward(self, call: dict):
        if call.get("labels") is None and call.get("shift_labels") is None:
            return None  # HF's forward: its head makes the logits, over our backbone
        prepared, batch, _ = self._batch(call)
        if prepared is None:
            return None
        n_items = call.get("num_items_in_batch")
        loss = packed_loss(prepared, batch, reduction="mean" if n_items is None else "sum",
                           checkpointer=self._checkpointer(prepared))
        if n_items is not None:  # HF's loss: the sum over the batch / the items of the whole step
            loss = loss / (n_items.to(loss.device) if torch.is_tensor(n_items) else n_items)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss, logits=None)

    def _backbone_forward(self, call: dict):
        prepared, batch, index = self._batch(call)
        if prepared is None:
            return None
        hidden = packed_hidden_states(prepared, batch, self._checkpointer(prepared))
        rows, width = call["input_ids"].shape
        if index is not None:  # back to the padded grid; padding positions get zeros
            hidden = hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy(0, index.to(hidden.device), hidden)
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=hidden.view(rows, width, -1))

    def _plant(self, module, run, known: set) -> None:
        """Set module.forward to one that routes training-style calls to `run`, all others to the forward
        that was there (HF's, or whatever another library planted before us)."""
        previous = module.forward
        params = inspect.signature(previous).parameters.values()
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

        @functools.wraps(previous)
        def forward(*args, **kwargs):
            call = self._routable(positional, args, kwargs, known)
            out = run(call) if call is not None else None
            if out is None:
                return previous(*args, **kwargs)
            return out.to_tuple() if call.get("return_dict") is False else out

        forward.lorafuse_patch = self
        self.planted.append((module, vars(module).get("forward"), forward))
        module.forward = forward

    def _routable(self, positional: list[str], args: tuple, kwargs: dict, known: set) -> dict | None:
        """The call's arguments by name when it is a training-style call we compute, else None."""
        if not self.active or len(args) > len(positional):
            return None
        call = dict(zip(positional, args), **kwargs)
        ids, mask = call.get("input_ids"), call.get("attention_mask")
        if (ids is None or ids.dim() != 2 or (mask is not None and mask.dim() != 2) or call.get("use_cache")
                or any(call.get(k) is not None for k in ("inputs_embeds", "past_key_values", "cache"))
                or call.get("output_attentions") or call.get("output_hidden_states")):
            return None
        unknown = sorted(k for k, v in call.items() if k not in known and v is not None)
        if unknown:
            if tuple(unknown) not in self.warned and torch.is_grad_enabled():
                self.warned.add(tuple(unknown))
                warnings.warn(f"lorafuse.patch: a forward with {', '.join(unknown)} runs HF's forward, not lorafuse's "
                              "(lorafuse does not know what to do with them)", stacklevel=4)
            return None
        q, k = call.get("cu_seq_lens_q"), call.get("cu_seq_lens_k")
        if k is not None and (q is None or not torch.equal(q.cpu(), k.cpu())):
            return None
        return call

    def remove(self) -> None:
        for module, before, ours in self.planted:
            if vars(module).get("forward") is ours:
                if before is None:
                    del module.forward
                else:
                    module.forward = before
            else:  # another library wrapped our forward since: ours now passes every call through
                warnings.warn(f"lorafuse.unpatch: {type(module).__name__}.forward was wrapped again after "
                              "lorafuse.patch; the lorafuse forward inside it now passes every call through",
                              stacklevel=3)
        self.active = False
        views = [param for base, stacked in self._stacked_weights(self.prepared)
                 for param, mine in ((base.weight, stacked.weight), (base.bias, stacked.bias))
                 if param is not None and mine is not None and _shared(param, mine)]
        self.prepared = self.checkpointer = None  # each stack is freed once its last view has its own copy
        for param in views + self.adapter_views:
            param.data = param.data.clone()
        self.adapter_views = []
