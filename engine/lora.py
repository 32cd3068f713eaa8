"""LoRA adapters: injection into a HF model, PEFT-format save and load, merge into the base.

A targeted nn.Linear becomes a LoraLinear holding the frozen base weight (and bias) and two
trainable float32 matrices in PEFT's layout: lora_A [r, in], lora_B [out, r], initialised as
PEFT does (A kaiming-uniform with a=sqrt(5), B zeros, so training starts from the base model).
The kernels read the float32 masters in place (no cast per call) and return float32 gradients; the
optimizer updates the masters. A decoder layer's q/k/v adapters (and its gate/up adapters) are views of one
buffer each (`stack_adapter_storage`), so the grouped kernels read them as one matrix with no copy per call.

Every LoRA projection runs through `lora_projections` (below): a LoraLinear's own forward (HF's
forward, generation) as well as the grouped q/k/v and gate/up projections of the packed forward,
which read their input once when the frozen weights are stacked (prepare.py). A PEFT LoRA layer of a
patched HF/PEFT model (patch.py) goes the same way: `active_adapter` reads its parameters.

Saved adapters use PEFT's file names and keys
(`base_model.model.<module path>.lora_A.weight`), so `PeftModel.from_pretrained` loads them.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lorafuse.kernels.nf4 import dequantize_nf4, is_nf4

from .config import LoraConfig
from .faults import crash_point
from .ops import TRITON, KernelOps
from .peft_lora import peft_adapter
from .quantize import NF4Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # frozen base, shared with the loaded model (no copy)
        self.bias = base.bias
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=device))
        self.enabled = True
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_projections(x, (self,))[0]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


# ---------------------------------------------------------------------------------------------
# The projection path


def active_adapter(proj) -> tuple | None:
    """(lora_A, lora_B, scaling, dropout probability) of a projection's active adapter: a LoraLinear's, or a
    PEFT LoRA layer's own parameters (peft_lora.py); None for a plain nn.Linear or an adapter turned off."""
    if isinstance(proj, LoraLinear):
        return (proj.lora_A, proj.lora_B, proj.scaling, proj.dropout) if proj.enabled else None
    return peft_adapter(proj)


def fusable(proj) -> bool:
    """Whether the fused kernels can run this projection. LoRA dropout feeds only the low-rank
    branch, so a kernel that reads one x for both branches cannot compute it."""
    adapter = active_adapter(proj)
    return adapter is None or not (adapter[3] > 0 and proj.training)


def adapter_args(proj) -> tuple:
    """(lora_a, lora_b, scaling) of a projection as the kernels take them (the masters, uncast); (None, None, 0.0)
    without an active adapter."""
    adapter = active_adapter(proj)
    if adapter is None:
        return None, None, 0.0
    lora_a, lora_b, scaling, _ = adapter
    return lora_a, lora_b, scaling


def lora_projections(x: torch.Tensor, projs, stacked=None, ops: KernelOps = TRITON, normed_from=None) -> tuple:
    """The outputs of the projections `projs` (nn.Linear or LoraLinear) of one input x.

    With their frozen weights stacked (`stacked`: a prepare.Stacked of exactly these projections)
    and every one fusable, one grouped kernel reads x once for all of them (and, given normed_from, the
    rms_norm.NormedInput that x is the output of, keeps the norm's input instead of x); otherwise each runs alone.
    """
    if stacked is not None and all(fusable(p) for p in projs):
        lora_as, lora_bs, scalings = zip(*(adapter_args(p) for p in projs))
        return ops.lora_linear_group(x, stacked.weight, list(lora_as), list(lora_bs), list(scalings),
                                     [p.out_features for p in projs], bias=stacked.bias, normed_from=normed_from)
    return tuple(_project(p, x, ops) for p in projs)


def _project(proj, x: torch.Tensor, ops: KernelOps) -> torch.Tensor:
    lora_a, lora_b, scaling = adapter_args(proj)
    if lora_a is None:
        return _frozen(proj, x, ops)
    if not fusable(proj):  # plain ops, as PEFT computes it
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        low_rank = F.linear(F.linear(F.dropout(x, active_adapter(proj)[3], training=True), lora_a), lora_b)
        return _frozen(proj, x, ops) + scaling * low_rank
    return ops.lora_linear(x, proj.weight, lora_a, lora_b, scaling, proj.bias)


def _frozen(proj, x: torch.Tensor, ops: KernelOps) -> torch.Tensor:
    """x W^T + b of the frozen base alone; an NF4 weight (QLoRA) runs our kernels, which dequantize it per call."""
    if is_nf4(proj.weight):
        return ops.lora_linear(x, proj.weight, None, None, 0.0, proj.bias)
    return F.linear(x, proj.weight, proj.bias)


# ---------------------------------------------------------------------------------------------
# Injection


FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def resolve_targets(model_type: str, targets: list[str]) -> list[str]:
    """lora.target_modules in the module names of the model's family: Phi-3 keeps q, k, v (and gate, up)
    in one projection each, so the Llama names of all of a fused projection's parts name it."""
    from .model import SUPPORTED

    known = SUPPORTED[model_type].projections
    resolved = [t for t in targets if t in known]
    for fused, parts in FUSED_PROJECTIONS.items():
        asked = [t for t in targets if t in parts]
        if fused in known and asked:
            if len(asked) != len(parts):
                raise ValueError(f"lora.target_modules: {model_type} computes {', '.join(parts)} in one projection "
                                 f"({fused}): target all of them or {fused}, not {', '.join(asked)}")
            resolved.append(fused)
    unknown = [t for t in targets if t not in known and not any(t in FUSED_PROJECTIONS.get(f, ()) for f in known)]
    if unknown:
        hint = " (a LoRA on lm_head is not supported: the fused loss reads the head weight directly)" \
            if "lm_head" in unknown else ""
        raise ValueError(f"lora.target_modules: unknown module(s) {unknown}; {model_type} has {list(known)}{hint}")
    return [name for name in known if name in resolved]


def inject_lora(model, cfg: LoraConfig) -> list[str]:
    """Replace each targeted projection of every decoder layer by a LoraLinear. Returns their names."""
    targets = resolve_targets(model.config.model_type, cfg.target_modules)
    names = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, (nn.Linear, NF4Linear)):  # NF4Linear: QLoRA (quantize.py)
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, leaf, LoraLinear(module, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora))
            names.append(name)
    if not names:
        raise ValueError(f"lora.target_modules {cfg.target_modules} matched no nn.Linear in the model")
    stack_adapter_storage(model)
    return names


def stack_adapter_storage(model) -> list[torch.Tensor]:
    """Make the active adapters of each decoder layer's q/k/v (and gate/up) views of one buffer, A's by rows and
    B's by rows, so the grouped kernels read the stack in place (lora_linear.py, _Adapters) instead of copying it
    every forward; returns the parameters now views. They stay the same Parameter objects (the optimizer, saving
    and PEFT see no difference); a group whose shapes, dtypes or devices differ is left as it is (the kernels
    then copy its stack per call). LoraLinear's and PEFT's LoRA layers alike (active_adapter)."""
    from .prepare import STACKED_GROUPS

    views = []
    for layer in getattr(getattr(model, "model", None), "layers", ()):
        for block, names in STACKED_GROUPS.items():
            mods = [getattr(getattr(layer, block, None), n, None) for n in names]
            # a PEFT layer turned off or merged is left alone (active_adapter would unmerge it)
            if any(m is None or getattr(m, "disable_adapters", False) or getattr(m, "merged", False) for m in mods):
                continue
            adapters = [active_adapter(m) for m in mods]
            if any(a is None for a in adapters):
                continue
            for idx in (0, 1):  # lora_A, lora_B
                params = [a[idx] for a in adapters]
                if len({(p.shape[1], p.dtype, p.device) for p in params}) != 1:
                    continue
                stack = torch.cat([p.detach() for p in params])
                start = 0
                for p in params:
                    p.data = stack[start:start + p.shape[0]]
                    start += p.shape[0]
                views += params
    return views


def lora_modules(model) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


@contextmanager
def adapters_disabled(model):
    """Run the base model: every LoraLinear acts as its frozen base layer."""
    mods = list(lora_modules(model).values())
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


# ---------------------------------------------------------------------------------------------
# PEFT format


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapters in PEFT's keys, float32 on the CPU. Sharded (train.parallel: fsdp) each tensor is
    gathered whole: a collective, so every rank calls this."""
    out = {}
    for name, m in lora_modules(model).items():
        for attr in ("lora_A", "lora_B"):
            out[f"{PEFT_PREFIX}{name}.{attr}.weight"] = _whole(getattr(m, attr)).to("cpu", torch.float32).contiguous()
    return out


def _whole(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.detach().full_tensor() if isinstance(param, DTensor) else param.detach()


def adapter_config(cfg: LoraConfig, base_model_path: str, target_modules: list[str]) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_path),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(target_modules),
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model, cfg: LoraConfig, out_dir: str | Path, base_model_path: str, write: bool = True) -> None:
    """Write adapter_config.json and adapter_model.safetensors into out_dir. Each file is written
    beside its final name and renamed, so a crash never leaves a half-written adapter. Sharded, every
    rank calls it (the weights are gathered) and the one with write=True writes."""
    state = adapter_state_dict(model)
    if not write:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_tmp = out_dir / (ADAPTER_WEIGHTS + ".tmp")
    save_file(state, str(weights_tmp), metadata={"format": "pt"})
    config_tmp = out_dir / (ADAPTER_CONFIG + ".tmp")
    # the projections that carry an adapter, in the model's own names (Phi-3: qkv_proj, not q_proj)
    targets = sorted({name.rsplit(".", 1)[-1] for name in lora_modules(model)})
    config_tmp.write_text(json.dumps(adapter_config(cfg, base_model_path, targets), indent=2))
    crash_point("adapter")
    os.replace(weights_tmp, out_dir / ADAPTER_WEIGHTS)
    os.replace(config_tmp, out_dir / ADAPTER_CONFIG)


def read_adapter_config(adapter_dir: str | Path) -> LoraConfig:
    """The LoRA settings of a PEFT adapter directory; a ValueError naming the file and key otherwise."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a PEFT/lorafuse adapter directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in raw]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    targets = raw["target_modules"]
    if isinstance(targets, str):
        raise ValueError(f"{path}: target_modules given as a regex ({targets!r}); list the module names instead")
    try:
        return LoraConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                          dropout=float(raw.get("lora_dropout") or 0.0), target_modules=list(targets),
                          use_rslora=bool(raw.get("use_rslora", False)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: a value has the wrong type ({e})") from None


def load_adapter_weights(model, adapter_dir: str | Path) -> None:
    """Copy an adapter's weights (safetensors only) into the model's LoraLinear modules."""
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise ValueError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    state = load_file(str(weights_path))
    expected = {f"{PEFT_PREFIX}{name}.{attr}.weight" for name in lora_modules(model) for attr in ("lora_A", "lora_B")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: keys do not match the model: {len(missing)} missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for name, m in lora_modules(model).items():
        for attr in ("lora_A", "lora_B"):
            tensor = state[f"{PEFT_PREFIX}{name}.{attr}.weight"]
            param = getattr(m, attr)
            if tensor.shape != param.shape:
                raise ValueError(f"{weights_path}: {name}.{attr} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            with torch.no_grad():
                _load_into(param, tensor)


def _load_into(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into this rank's rows of a sharded one."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from .sharding import shard_rows

        start, end = shard_rows(param.shape[0], param.device_mesh.get_local_rank(), param.device_mesh.size())
        param.to_local().copy_(whole[start:end])
    else:
        param.copy_(whole)


def load_adapter(model, adapter_dir: str | Path) -> LoraConfig:
    """Inject LoRA as the adapter's config says and load its weights."""
    cfg = read_adapter_config(adapter_dir)
    inject_lora(model, cfg)
    load_adapter_weights(model, adapter_dir)
    return cfg


def merge_lora(model) -> int:
    """Fold every adapter into its base weight (W += s B A; an NF4 base dequantized first, in float32) and put
    plain nn.Linear layers back."""
    merged = 0
    for name, m in list(lora_modules(model).items()):
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                           device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            delta = m.scaling * (m.lora_B.float() @ m.lora_A.float())
            base = dequantize_nf4(m.weight, torch.float32) if is_nf4(m.weight) else m.weight.float()
            linear.weight.copy_((base + delta).to(m.weight.dtype))
            if m.bias is not None:
                linear.bias.copy_(m.bias)
        linear.requires_grad_(False)
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, linear)
        merged += 1
    return merged
