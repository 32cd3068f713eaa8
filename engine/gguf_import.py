"""`lorafuse import-gguf FILE.gguf OUT_DIR`: a llama.cpp GGUF file as a plain HF model directory.

transformers reads GGUF files of the llama family (its GGUF loader needs the `gguf` package) and
dequantizes every tensor; we save the result as any HF directory is saved (config.json without a
quantization entry, model.safetensors in the chosen dtype, the tokenizer with its chat template), so
training, evaluation and merging read it like a downloaded model. The architecture is checked from the
file's metadata before any tensor is read, and one lorafuse cannot train is refused by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .merge import write_model_dir
from .model import SUPPORTED, ModelError, check_supported

# general.architecture of a GGUF file -> the HF model_type transformers builds from it (where they differ)
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def gguf_architecture(path: Path) -> str:
    """general.architecture from the file's header (the tensors are memory-mapped, not read)."""
    try:
        import gguf
    except ImportError:
        raise ModelError("reading GGUF files needs the gguf package: pip install gguf "
                         "(or pip install 'lorafuse[demo]')") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, ... on a file that is not GGUF
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelError(f"{path}: no general.architecture in the GGUF metadata")
    return str(field.contents())


def import_gguf(gguf_file: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False,
                log=print) -> Path:
    """Dequantize a GGUF file of a supported family into the HF model directory out_dir (written beside it and
    renamed into place, so a crash leaves no half directory). Returns out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, target = Path(gguf_file), Path(out_dir)
    if not source.is_file():
        raise ModelError(f"GGUF file not found: {source}")
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ModelError(f"{target} exists and is not empty; pass --overwrite to replace it")
    arch = gguf_architecture(source)
    model_type = GGUF_MODEL_TYPES.get(arch, arch)
    if model_type not in SUPPORTED:
        raise ModelError(f"{source}: GGUF architecture {arch!r} is not supported; lorafuse trains "
                         f"{', '.join(sorted(SUPPORTED))}")
    folder, name = str(source.parent), source.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError) as e:  # transformers' own list of GGUF architectures is narrower than ours
        raise ModelError(f"{source}: transformers cannot read GGUF architecture {arch!r} ({e})") from None
    log(f"[import] {source.name}: {arch}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocabulary {config.vocab_size}; dequantizing to {dtype}")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are plain tensors now: saved without the GGUF entry, the directory loads like any other.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.config.dtype = dtype
    target.parent.mkdir(parents=True, exist_ok=True)
    write_model_dir(target, model, tokenizer, "importing")
    check_supported(target)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[import] {n_params / 1e6:.1f}M parameters -> {target}")
    return target
