"""train.parallel: fsdp — loading a model straight into its shards: each rank reads only its rows of each
weight from the safetensors files, so no process ever holds the whole model.

The model is built on the meta device (shapes only), prepared (stacked q/k/v and gate/up), given its
LoRA adapters and sharded (sharding.py); then each rank allocates its shards and fills them: frozen
weights by slicing the checkpoint's tensors (a stacked weight from the rows of its parts), LoRA A
matrices by drawing exactly what a single process draws (the same generator state, the same order, the
full matrix, then this rank's rows), B with zeros. What is built from the config rather than read
(RoPE frequencies, Gemma's embedding scale) is built again for real.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn

from .config import LoraConfig
from .lora import LoraLinear, inject_lora
from .model import check_supported
from .prepare import PreparedModel, prepare_model
from .sharding import shard_model


def load_sharded(path: str, dtype: torch.dtype, device: torch.device, lora: LoraConfig, mesh, *,
                 attention: str = "auto", kernels: str = "auto"):
    """(HF model, sharded PreparedModel) with LoRA injected; every rank holds only its shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = check_supported(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation="eager" if raw.get("attn_logit_softcapping") else "sdpa")
    model.requires_grad_(False)
    model.eval()
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)  # tables from the config
    prepared = prepare_model(model, attention=attention, kernels=kernels)
    lora_draws = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    inject_lora(model, lora)
    prepared = shard_model(prepared, mesh)
    prepared.sharded.to_empty(device=device)
    _rebuild_buffers(model)
    _fill_frozen(prepared, Path(path))
    _init_lora(model, lora_draws, device)
    return model, dataclasses.replace(prepared, device=device)


def _rebuild_buffers(model) -> None:
    """Buffers computed from the config rather than read (Gemma's embedding scale), lost by to_empty."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            continue  # built for real before sharding
        for buffer in getattr(module, "_non_persistent_buffers_set", ()):
            if buffer == "embed_scale" and hasattr(module, "scalar_embed_scale"):
                module.embed_scale.fill_(module.scalar_embed_scale)
            else:
                raise NotImplementedError(f"train.parallel=fsdp: cannot rebuild {name}.{buffer} after loading "
                                          "shards; use train.parallel=ddp for this model")


def _fill_frozen(prepared: PreparedModel, path: Path) -> None:
    """Each frozen parameter's local rows, read from the checkpoint (sharding.shard_rows' split)."""
    files = _weight_files(path)
    tied = getattr(prepared.model.config, "tie_word_embeddings", False)
    with _Reader(files) as reader:
        for name, param in prepared.sharded.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                continue
            local = param.to_local()
            start, end = _local_rows(param)
            if end <= start:
                continue
            parts = _checkpoint_parts(name, prepared, tied)
            rows, offset = [], 0
            for key, n in parts:  # the parts of a stacked weight, one after the other by rows
                n = param.shape[0] if n is None else n
                lo, hi = max(start - offset, 0), min(end - offset, n)
                if hi > lo:
                    rows.append(reader.rows(key, lo, hi))
                offset += n
            with torch.no_grad():
                local.copy_(torch.cat(rows).to(local.dtype))


STACKED_PARTS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "gate_up": ("mlp", ("gate_proj", "up_proj"))}


def _checkpoint_parts(name: str, prepared: PreparedModel, tied: bool) -> list[tuple[str, int | None]]:
    """The checkpoint keys of a parameter of ShardedModel, with their row counts when it stacks several
    (None: the parameter is that one tensor)."""
    fixed = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "model.embed_tokens.weight" if tied else "lm_head.weight"}
    if name in fixed:
        return [(fixed[name], None)]
    _, index, rest = name.split(".", 2)  # layers.<i>.<rest>
    if rest.startswith("block."):
        return [(f"model.layers.{index}.{rest.removeprefix('block.')}", None)]
    group, kind = rest.rsplit("_", 1)  # qkv_weight, gate_up_bias, ...
    block_name, names = STACKED_PARTS[group]
    block = getattr(prepared.layers[int(index)].module, block_name)
    return [(f"model.layers.{index}.{block_name}.{n}.{kind}", getattr(block, n).out_features) for n in names]


def _init_lora(model, draws, device: torch.device) -> None:
    """A as a single process draws it (same generator state, same module order), this rank's rows; B zeros."""
    cpu_state, cuda_state = draws
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        full = torch.empty(module.r, module.in_features, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5))
        for param, value in ((module.lora_A, full), (module.lora_B, None)):
            start, end = _local_rows(param)
            with torch.no_grad():
                if value is None:
                    param.to_local().zero_()
                else:
                    param.to_local().copy_(value[start:end])


def _local_rows(param) -> tuple[int, int]:
    from .sharding import shard_rows

    mesh = param.device_mesh
    return shard_rows(param.shape[0], mesh.get_local_rank(), mesh.size())


def _weight_files(path: Path) -> dict[str, Path]:
    """checkpoint key -> its safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    files = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), file))
    return files


class _Reader:
    """Row slices of checkpoint tensors, each file opened once (memory-mapped: only the rows read are)."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.handles = files, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handles.clear()

    def rows(self, key: str, start: int, end: int | None) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.files:
            raise KeyError(f"{key}: not in the model's safetensors files")
        file = self.files[key]
        if file not in self.handles:
            self.handles[file] = safe_open(str(file), framework="pt")
        piece = self.handles[file].get_slice(key)
        return piece[start:end] if len(piece.get_shape()) > 0 else piece[:]
