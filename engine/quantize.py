"""QLoRA: the frozen projections of the decoder layers in 4-bit NF4 (kernels/nf4.py, bitsandbytes' format).

`quantize: nf4` (config) or `--quantize nf4` (eval, merge) quantizes, at load time, every projection the
family's LoRA can target (model.SUPPORTED[...].projections: q/k/v/o and gate/up/down, Phi-3's fused ones),
whether or not an adapter goes on it; embeddings, norms and lm_head stay in the compute dtype. A directory
that bitsandbytes quantized (config.json `quantization_config`: bitsandbytes, load_in_4bit, nf4) is read
as it is stored, without bitsandbytes: each quantized module's `<module>.weight` (packed uint8),
`.weight.absmax`, `.weight.quant_map`, `.weight.nested_absmax`, `.weight.nested_quant_map` and the JSON of
`.weight.quant_state.bitsandbytes__nf4` (quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype,
nested_offset): the names bitsandbytes' QuantState.as_dict(packed=True) writes under `<module>.weight.`.
Every other quantization method is refused by name.

Loading (load_quantized): the model is built on the meta device (shapes, no memory) and its weights are
read one tensor at a time from the safetensors files, in module order, each projection quantized on the
target device as soon as it is read, so the host holds one tensor beyond what the device keeps. What no file
holds (RoPE frequencies, Gemma's embedding scale) HF's own initialisation fills in, as its from_pretrained
does; tied embeddings are tied.

A quantized projection is an NF4Linear: its `weight` an NF4Weight module (buffers, so it moves with the model),
its forward the frozen linear on our kernels, so HF's own forward and generate run it; a LoraLinear on it keeps
the same NF4Weight as its base weight (lora.py), and the kernels dequantize it per call (lora_linear.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from lorafuse.kernels.lora_linear import lora_linear
from lorafuse.kernels.nf4 import NF4Weight, is_nf4, quantize_nf4

from .config import QUANTIZE
from .model import SUPPORTED, ModelError


class NF4Linear(nn.Module):
    """A frozen projection y = x W^T + bias whose W is an NF4Weight (dequantized per call by our kernels)."""

    def __init__(self, weight: NF4Weight, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.weight, None, None, 0.0, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------------------------
# What is quantized, and what it takes


def projection_names(model) -> list[str]:
    """Module paths of the projections QLoRA quantizes: the family's LoRA targets in every decoder layer."""
    targets = SUPPORTED[model.config.model_type].projections
    return [name for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in targets and ".layers." in f".{name}" and _is_linear(module)]


def _is_linear(module) -> bool:
    return isinstance(module, (nn.Linear, NF4Linear))


def checkpoint_quantization(raw: dict, path) -> str | None:
    """"nf4" for a directory bitsandbytes quantized to 4-bit NF4, None for plain weights; a ModelError naming
    any other quantization."""
    qc = raw.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
    if method != "bitsandbytes":
        raise ModelError(f"{path}: the weights are quantized with {method} (config.json quantization_config); lorafuse "
                         "reads bitsandbytes NF4 checkpoints only (or quantizes plain weights itself: quantize: nf4)")
    if qc.get("load_in_8bit"):
        raise ModelError(f"{path}: the weights are bitsandbytes 8-bit (LLM.int8, load_in_8bit); lorafuse reads "
                         "bitsandbytes 4-bit NF4 only")
    kind = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' and transformers' default is fp4
    if not qc.get("load_in_4bit") or kind != "nf4":
        what = f"bnb_4bit_quant_type {kind!r}" if qc.get("load_in_4bit") else "neither load_in_4bit nor load_in_8bit"
        raise ModelError(f"{path}: a bitsandbytes checkpoint with {what}; lorafuse reads 4-bit NF4 only")
    return "nf4"


def check_quantize(quantize: str) -> str:
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    return quantize


def quantized_weights(model) -> list[NF4Weight]:
    return [m for m in model.modules() if is_nf4(m)]


def frozen_weight_bytes(model) -> int:
    """Bytes the frozen weights take as stored: parameters that do not train, and NF4 weights (packed codes,
    absmax, codebooks)."""
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return dense + sum(w.nbytes for w in quantized_weights(model))


def frozen_weight_bytes_unquantized(model, dtype: torch.dtype) -> int:
    """What the same frozen weights would take with every NF4 weight dense in `dtype`."""
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return dense + sum(w.numel() * itemsize for w in quantized_weights(model))


def quantized_numel(model) -> int:
    return sum(w.numel() for w in quantized_weights(model))


def dequantize_workspace_bytes(model, dtype: torch.dtype) -> int:
    """The largest dense weight one kernel call dequantizes: a projection, or q/k/v and gate/up stacked
    (prepare.py stacks them). It lives only during its GEMMs, one at a time."""
    from .prepare import STACKED_GROUPS

    itemsize = torch.empty((), dtype=dtype).element_size()
    largest = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if is_nf4(weight):
            largest = max(largest, weight.numel())
        group = STACKED_GROUPS.get(name.rsplit(".", 1)[-1], ())
        sizes = [getattr(module, g).weight.numel() for g in group if is_nf4(getattr(getattr(module, g, None), "weight",
                                                                                            None))]
        if len(sizes) == len(group) and sizes:
            largest = max(largest, sum(sizes))
    return largest * itemsize


def describe_weights(model, dtype: torch.dtype) -> str:
    """'frozen weights 4.21 GiB (nf4: 0.27x of bfloat16)' for the [model] log line."""
    stored = frozen_weight_bytes(model)
    text = f"frozen weights {_size(stored)}"
    if quantized_weights(model):
        dense = frozen_weight_bytes_unquantized(model, dtype)
        text += f" (nf4: {stored / dense:.2f}x of {str(dtype).removeprefix('torch.')})"
    return text


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------------------------
# Quantizing a model that is already loaded, or its shapes only


def quantize_model(model, log=None) -> int:
    """Replace every projection of projection_names by an NF4Linear quantized from its weight, in place, one at
    a time (each dense weight is freed as soon as its NF4 copy exists). Returns how many."""
    names = [n for n in projection_names(model) if isinstance(model.get_submodule(n), nn.Linear)]
    for name in names:
        linear = model.get_submodule(name)
        weight = quantize_nf4(linear.weight.detach(), f"{name}.weight", dtype=linear.weight.dtype)
        _replace(model, name, NF4Linear(weight, linear.bias))
    if log and names:
        log(f"[model] quantized {len(names)} projections to NF4 ({describe_weights(model, _dtype(model))})")
    return len(names)


def quantize_meta(model) -> int:
    """Quantize a model built on the meta device (lorafuse plan): its projections become NF4Linear with buffers of
    the sizes a real load gives, so the byte counts above hold, with no weight read."""
    names = [n for n in projection_names(model) if isinstance(model.get_submodule(n), nn.Linear)]
    for name in names:
        linear = model.get_submodule(name)
        _replace(model, name, NF4Linear(nf4_placeholder(tuple(linear.weight.shape), linear.weight.dtype), linear.bias))
    return len(names)


def dequantize_model(model) -> int:
    """Every NF4Linear back to a plain nn.Linear holding its dequantized weight (in the weight's dtype), in place
    (lorafuse merge writes a normal HF directory). Returns how many."""
    from lorafuse.kernels.nf4 import dequantize_nf4

    names = [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device,
                           dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(dequantize_nf4(weight, weight.dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        _replace(model, name, linear)
    return len(names)


def nf4_placeholder(shape, dtype, device="meta") -> NF4Weight:
    n = shape[0] * shape[1]
    blocks = -(-n // 64)
    groups = -(-blocks // 256)

    def empty(size, kind):
        return torch.empty(size, dtype=kind, device=device)

    return NF4Weight(empty((n + 1) // 2, torch.uint8), empty(blocks, torch.uint8), empty(groups, torch.float32),
                     empty(groups, torch.float32), empty(16, torch.float32), empty(256, torch.float32), shape, dtype)


def _replace(model, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# ----------------------------------------------------------------------------------------------
# Loading, tensor by tensor


class _Checkpoint:
    """The safetensors files of a model directory, read one tensor at a time (memory-mapped)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.where = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            handle = safe_open(str(file), framework="pt", device="cpu")
            for key in handle.keys():
                self.where[key] = (handle, file)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def read(self, key: str) -> torch.Tensor:
        handle, _ = self.where[key]
        return handle.get_tensor(key)

    def file_of(self, key: str) -> str:
        return self.where[key][1].name


def load_quantized(path: str | Path, raw: dict, dtype: torch.dtype, device: torch.device, quantize: str,
                   attention: str):
    """The HF model of `path` with its projections in NF4: quantized here as they are read (quantize "nf4"),
    or read as bitsandbytes stored them (a bitsandbytes NF4 directory). Every weight frozen, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    stored = checkpoint_quantization(raw, path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if hasattr(config, "quantization_config"):  # ours to read: HF would call bitsandbytes for it
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    ckpt = _Checkpoint(path)
    targets = set(projection_names(model))
    for name, module in list(model.named_modules()):  # in module order: layer after layer
        if name in targets and (stored or quantize == "nf4"):
            weight = _read_projection(ckpt, path, name, dtype, device, stored is not None, quantize == "nf4")
            if weight is not None:
                bias = _parameter(ckpt, f"{name}.bias", dtype, device) if module.bias is not None else None
                _replace(model, name, NF4Linear(weight, bias))
                continue
        for pname in list(module._parameters):
            key = f"{name}.{pname}" if name else pname
            if module._parameters[pname] is not None and key in ckpt:
                module._parameters[pname] = _parameter(ckpt, key, dtype, device)
    _finish_loading(model, device, path)
    model.requires_grad_(False)
    model.eval()
    return model


def _parameter(ckpt: _Checkpoint, key: str, dtype, device) -> nn.Parameter:
    tensor = ckpt.read(key)
    param = nn.Parameter(tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype),
                         requires_grad=False)
    param._is_hf_initialized = True  # HF's initialisation below leaves it alone
    return param


def _read_projection(ckpt: _Checkpoint, path: Path, name: str, dtype, device, stored: bool,
                     quantize: bool) -> NF4Weight | None:
    """The NF4Weight of projection `name`: as bitsandbytes stored it, or quantized from its dense weight (when
    asked to, or for a module a bitsandbytes checkpoint kept dense: not at all, None)."""
    if stored and any(f"{name}.weight.quant_state.bitsandbytes__{kind}" in ckpt for kind in ("nf4", "fp4")):
        return read_bnb_weight(ckpt, name, dtype, where=path).to(device)
    key = f"{name}.weight"
    if not quantize:
        return None
    if key not in ckpt:
        raise ModelError(f"{path}: no weight {key} in its safetensors files")
    return quantize_nf4(ckpt.read(key).to(device), f"{path}: {key}", dtype=dtype)


def read_bnb_weight(ckpt, name: str, dtype: torch.dtype, where="") -> NF4Weight:
    """The NF4Weight of a module bitsandbytes saved (module docstring: the keys under `<name>.weight.`)."""
    prefix = f"{name}.weight"
    if f"{prefix}.quant_state.bitsandbytes__nf4" not in ckpt:
        kind = "fp4" if f"{prefix}.quant_state.bitsandbytes__fp4" in ckpt else "no quant_state"
        raise ModelError(f"{where}: {prefix} is bitsandbytes {kind}; lorafuse reads NF4 only")
    try:
        state = json.loads(bytes(ckpt.read(f"{prefix}.quant_state.bitsandbytes__nf4").tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{where}: {prefix}.quant_state.bitsandbytes__nf4 is not JSON ({e})") from None
    if state.get("quant_type") != "nf4":
        raise ModelError(f"{where}: {prefix} has quant_type {state.get('quant_type')!r}; lorafuse reads nf4 only")
    nested = f"{prefix}.nested_absmax" in ckpt
    missing = [k for k in (prefix, f"{prefix}.absmax", f"{prefix}.quant_map",
                           *((f"{prefix}.nested_quant_map",) if nested else ())) if k not in ckpt]
    if missing:
        raise ModelError(f"{where}: {name} is quantized but its checkpoint lacks {', '.join(missing)}")
    packed = ckpt.read(prefix)
    packed = (packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)).reshape(-1)
    absmax = ckpt.read(f"{prefix}.absmax").reshape(-1)
    code = ckpt.read(f"{prefix}.quant_map").float().reshape(-1)
    empty = torch.empty(0, dtype=torch.float32)
    nested_absmax = ckpt.read(f"{prefix}.nested_absmax").float().reshape(-1) if nested else empty
    nested_code = ckpt.read(f"{prefix}.nested_quant_map").float().reshape(-1) if nested else empty
    offsets = (torch.full((nested_absmax.numel(),), float(state.get("nested_offset", 0.0)), dtype=torch.float32)
               if nested else empty)
    if not nested:
        absmax = absmax.float()
    shape = tuple(state.get("shape") or ())
    if len(shape) != 2:
        raise ModelError(f"{where}: {prefix}: quant_state shape {shape} is not 2-D")
    try:
        return NF4Weight(packed, absmax, nested_absmax, offsets, code, nested_code, shape, dtype,
                         blocksize=int(state.get("blocksize", 64)),
                         nested_blocksize=int(state.get("nested_blocksize", 256)))
    except ValueError as e:
        raise ModelError(f"{where}: {prefix}: {e}") from None


def _finish_loading(model, device: torch.device, path: Path) -> None:
    """Tie the embeddings, refuse weights no file held, and let HF fill what no file holds (non-persistent
    buffers: RoPE frequencies, Gemma's embedding scale), as its own from_pretrained does."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelError(f"{path}: the safetensors files lack {len(missing)} weight(s) of the model, e.g. "
                         f"{', '.join(missing[:3])}")
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            owner._buffers[leaf] = torch.empty_like(buffer, device=device)
    model.initialize_weights()
    still = [name for name, b in model.named_buffers() if b.is_meta]
    if still:
        raise ModelError(f"{path}: cannot initialise {', '.join(still[:3])}")
    generation = path / "generation_config.json"
    if generation.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
