"""Merge an adapter into its base model and save the result as a plain HF model directory
(`lorafuse merge`, `lorafuse.merge`). The fold itself (W + s B A) is lora.merge_lora."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .lora import load_adapter, merge_lora, read_adapter_config
from .model import ModelError, check_supported, load_model, load_tokenizer
from .quantize import dequantize_model


def merge(model: str | Path, adapter: str | Path, out: str | Path, *, dtype: str = "auto",
          overwrite: bool = False, quantize: str = "none") -> int:
    """Fold `adapter` into the model directory `model` and write the merged model with its tokenizer to `out`;
    returns the number of merged projections. dtype "auto" keeps the dtype the base model was saved in.
    quantize "nf4" (an adapter trained with QLoRA) or a base that bitsandbytes quantized: the adapters fold into
    the dequantized NF4 weights the adapter was trained on, and every projection is written dense.
    Refuses (ModelError) to write over the base model, or into a non-empty `out`, unless overwrite."""
    saved = check_supported(model)
    read_adapter_config(adapter)
    target, base = Path(out).resolve(), Path(model).resolve()
    if not overwrite:
        if target == base or base in target.parents:
            raise ModelError(f"--out {out} is the base model directory or inside it; merging there would "
                             "overwrite the base model (pass --overwrite if that is what you want)")
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ModelError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    name = dtype if dtype != "auto" else saved.get("dtype") or saved.get("torch_dtype") or "float32"
    hf_model = load_model(model, getattr(torch, name), torch.device("cpu"), quantize=quantize)
    load_adapter(hf_model, adapter)
    n = merge_lora(hf_model)
    dequantize_model(hf_model)  # the projections without adapter: a normal HF directory has no NF4 in it
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    write_model_dir(target, hf_model, tokenizer, "merging")
    return n


def write_model_dir(target: Path, hf_model, tokenizer, doing: str) -> None:
    """Save a HF model and its tokenizer as `target`, written beside it and renamed into place: a crash leaves
    the old directory or the new one, whole. `doing` names the temporary directory (".NAME.<doing>-...")."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{doing}-", dir=target.parent))
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
