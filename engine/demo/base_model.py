"""Build small HF model directories locally: a byte-level BPE tokenizer trained on given text, a
Llama-family model with random weights, and a short pre-training so the demo's base model
knows the language before it is fine-tuned. Nothing is downloaded.

Tests use the same builders for tiny models of each supported architecture.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE on texts and save it, with a chat template, as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_config(model_type: str = "llama", vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, intermediate: int = 128, max_positions: int = 2048, **extra):
    """A small config of a supported architecture (GQA when kv_heads < heads)."""
    from transformers import AutoConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=intermediate,
                  max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type == "qwen2":
        kwargs["use_sliding_window"] = False
    if model_type == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(extra)
    return AutoConfig.for_model(model_type, **kwargs)


def build_model(config, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random-weight model from config, saved as safetensors in out_dir."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def pretrain(model_dir: str | Path, texts: list[str], tokenizer, steps: int, tokens_per_step: int = 4096,
             lr: float = 3e-3, seed: int = 0, seq_len: int = 256, log=print) -> list[float]:
    """Full-parameter next-token training of the model in model_dir on texts (packed, our forward),
    saved back in place. Returns the loss of each step."""
    from ..data import Document
    from ..model import load_model
    from ..packing import pack
    from ..prepare import prepare_model
    from ..step import train_step

    torch.manual_seed(seed)
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    model.requires_grad_(True)
    model.train()
    prepared = prepare_model(model, stack_projections=False)  # every weight trains: no stacked copies
    docs = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: seq_len - 2]
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        docs.append(Document(torch.tensor(ids).numpy(), torch.ones(len(ids), dtype=torch.bool).numpy()))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    losses, step, t0 = [], 0, time.perf_counter()
    warmup = max(1, steps // 20)
    while step < steps:
        for batch in pack(docs, tokens_per_step, seed=seed + step, shuffle=True):
            if step >= steps:
                break
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr * max(scale, 0.05)
            losses.append(train_step(prepared, [batch], opt, params, max_grad_norm=1.0).loss)
            step += 1
            if step % max(1, steps // 6) == 0 or step == steps:
                log(f"  pre-train step {step}/{steps}  loss {losses[-1]:.3f}  ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return losses
