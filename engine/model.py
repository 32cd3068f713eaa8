"""Load a local HuggingFace causal LM and check that lorafuse can train it.

Weights are read with safetensors only (never pickle). The model object stays a normal
transformers model, so HF's own forward and generate keep working (evaluation uses them); the
training forward is ours (forward.py): packed, on our kernels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Family:
    """What differs from Llama in a decoder family (prepare.DecoderSpec and forward.py read these)."""

    hf_class: str  # the transformers class of the family
    qk_norm: bool = False  # RMSNorm of q and k per head (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + w): Gemma's (1 + w)
    sandwich_norms: bool = False  # Gemma 2/3: a norm after attention and before/after the MLP, residual after
    fused_qkv: bool = False  # Phi-3: q, k, v (and gate, up) are one projection in the checkpoint
    activation_key: str = "hidden_act"  # the config key naming the MLP activation
    projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# model_type -> its family; any other model_type is refused by name
SUPPORTED = {
    "llama": Family("LlamaForCausalLM"),
    "mistral": Family("MistralForCausalLM"),
    "qwen2": Family("Qwen2ForCausalLM"),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm=True),
    "gemma": Family("GemmaForCausalLM", norm_offset=1.0),
    "gemma2": Family("Gemma2ForCausalLM", norm_offset=1.0, sandwich_norms=True, activation_key="hidden_activation"),
    "gemma3_text": Family("Gemma3ForCausalLM", qk_norm=True, norm_offset=1.0, sandwich_norms=True,
                          activation_key="hidden_activation"),
    "phi3": Family("Phi3ForCausalLM", fused_qkv=True, projections=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}
# HF activation name -> the GLU our fused MLP computes
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class ModelError(ValueError):
    """The model directory cannot be used; the message says why."""


def read_config(path: str | Path) -> dict:
    if not str(path).strip():
        raise ModelError("no model directory given (config key 'model', or --model)")
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path}: no config.json; expected a HuggingFace model directory")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file}: invalid JSON: {e}") from None


def check_supported(path: str | Path, weights: bool = True) -> dict:
    """config.json of a model lorafuse can train; weights=False: its weight files need not be there yet
    (lorafuse plan)."""
    raw = read_config(path)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        arch = ", ".join(raw.get("architectures") or ["?"])
        raise ModelError(f"{path}: architecture {arch} (model_type {model_type!r}) is not supported; "
                         f"lorafuse trains {', '.join(sorted(SUPPORTED))}")
    family = SUPPORTED[model_type]
    act = raw.get(family.activation_key) or raw.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise ModelError(f"{path}: {family.activation_key} {act!r} is not supported (the fused MLP computes "
                         f"{', '.join(sorted(ACTIVATIONS))})")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) == "longrope":
        raise ModelError(f"{path}: LongRoPE (rope_type 'longrope', Phi-3 128k) switches frequencies with the sequence "
                         "length; lorafuse does not implement it")
    if float((rope or {}).get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ModelError(f"{path}: partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    if weights and not list(Path(path).glob("*.safetensors")):
        raise ModelError(f"{path}: no *.safetensors weights (lorafuse does not load pickled .bin weights; "
                         "convert them with safetensors first)")
    from .quantize import checkpoint_quantization

    checkpoint_quantization(raw, path)  # bitsandbytes NF4, or plain weights; any other quantization is refused
    stock = family.hf_class
    custom = [a for a in raw.get("architectures") or [] if a != stock]
    if raw.get("auto_map") and custom:
        raise ModelError(f"{path}: config.json asks for custom code (auto_map, architecture {', '.join(custom)}); "
                         f"lorafuse trains only its own implementation of {stock} and runs no code from a model "
                         "directory")
    return raw


def custom_code_notes(raw: dict) -> list[str]:
    """What a checked config's auto_map means for training: its custom code is not used."""
    if not raw.get("auto_map"):
        return []
    stock = SUPPORTED[raw["model_type"]].hf_class
    return [f"config.json has auto_map (custom code); it is ignored: lorafuse trains its own {stock}, "
            "which this architecture is"]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} asked for, but no CUDA GPU is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    if not str(path).strip():
        raise ModelError("no model directory given (config key 'model', or --model)")
    if not Path(path).is_dir():  # else transformers takes the path for a hub repository id
        raise ModelError(f"model directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types here; the path is what the user needs
        raise ModelError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device, quantize: str = "none"):
    """The HF model with every weight frozen, in `dtype`, on `device`. quantize "nf4", or a checkpoint that
    bitsandbytes quantized to NF4: the projections in NF4, read tensor by tensor (quantize.py)."""
    from transformers import AutoModelForCausalLM

    from .quantize import check_quantize, checkpoint_quantization, load_quantized

    raw = check_supported(path)
    # HF's SDPA path ignores attention-logit softcapping (Gemma 2): its eager path computes the model exactly
    attention = "eager" if raw.get("attn_logit_softcapping") else "sdpa"
    if check_quantize(quantize) != "none" or checkpoint_quantization(raw, path):
        return load_quantized(path, raw, dtype, device, quantize, attention)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation=attention)
    model.to(device)
    model.requires_grad_(False)
    model.eval()  # no HF dropout; LoRA dropout is ours and follows module.training
    return model


def layer_window(config, layer: int) -> int | None:
    """The sliding window of decoder layer `layer` (keys i - window < j <= i), None for full attention:
    config.sliding_window on the layers layer_types calls "sliding_attention" (Gemma 2/3's alternating
    layers, Qwen2's upper layers), on every layer when there are no layer_types (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer] == "sliding_attention" else None
    return window


def count_parameters(model) -> tuple[int, int]:
    """(frozen, trainable) parameter counts, embeddings and NF4 weights (their values) included in frozen."""
    from .quantize import quantized_numel

    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) + quantized_numel(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return frozen, trainable
