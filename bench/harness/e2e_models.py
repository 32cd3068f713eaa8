"""The models of the end-to-end benchmark: the published shapes of the real models (so nothing is
downloaded), built with random weights, and the LoRA every system puts on them."""

from __future__ import annotations

import torch

LORA_R, LORA_ALPHA = 16, 32.0
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

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
    "llama-20m": dict(  # the CPU speed benchmark (bench/cpu_speed.py): 19M parameters, Llama-shaped
        model_type="llama", vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "tiny": dict(  # the CPU smoke test
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


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


def expected_lora_parameters(config, r: int = LORA_R) -> int:
    """LoRA parameters of r on the seven projections of every layer: r * (in + out) each."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    return r * per_layer * config.num_hidden_layers
