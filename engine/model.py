"""Load a local HuggingFace causal LM and check that lorafuse can train it.

Weights are read with safetensors only (never pickle). The model object stays a normal
transformers model, so HF's own forward and generate keep working (evaluation uses them); the
training forward is ours (forward.py): packed, on our kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# model_type -> what differs from Llama in the decoder (prepare.DecoderSpec reads these)
SUPPORTED = {
    "llama": {"qk_norm": False, "class": "LlamaForCausalLM"},
    "mistral": {"qk_norm": False, "class": "MistralForCausalLM"},
    "qwen2": {"qk_norm": False, "class": "Qwen2ForCausalLM"},
    "qwen3": {"qk_norm": True, "class": "Qwen3ForCausalLM"},
}


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
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"{path}: hidden_act {act!r} is not supported (the fused MLP is SwiGLU: silu)")
    if weights and not list(Path(path).glob("*.safetensors")):
        raise ModelError(f"{path}: no *.safetensors weights (lorafuse does not load pickled .bin weights; "
                         "convert them with safetensors first)")
    stock = SUPPORTED[model_type]["class"]
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
    stock = SUPPORTED[raw["model_type"]]["class"]
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


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device):
    """The HF model with every weight frozen, in `dtype`, on `device`."""
    from transformers import AutoModelForCausalLM

    check_supported(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation="sdpa")
    model.to(device)
    model.requires_grad_(False)
    model.eval()  # no HF dropout; LoRA dropout is ours and follows module.training
    return model


def sliding_window_limit(model) -> int | None:
    """The smallest active sliding window of any layer (None if all layers attend fully).

    Our attention is full causal within a document, which equals sliding-window attention only
    while documents are no longer than the window.
    """
    c = model.config
    window = getattr(c, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(c, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if c.model_type == "qwen2" and not getattr(c, "use_sliding_window", False):
        return None
    return window


def count_parameters(model) -> tuple[int, int]:
    """(frozen, trainable) parameter counts, embeddings included in frozen."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return frozen, trainable
