"""Several named adapters on one model, one active at a time: train one adapter per task, load them all
on one base model, and switch between them without reloading anything.

    model = AutoModelForCausalLM.from_pretrained(path)           # or lorafuse.engine.model.load_model
    adapters = lorafuse.load_adapters(model, {"tickets": "runs/tickets", "sql": "runs/sql"})
    adapters.use("sql")          # generate, evaluate, ... with the sql adapter
    adapters.use(None)           # the base model
    with adapters.using("tickets"): ...

Every projection that any of the adapters targets becomes a LoraLinear (lora.py) once; each adapter's
weights are read once and kept on the model's device. `use` points each LoraLinear at the chosen adapter's
tensors (no copy) and turns off the projections that adapter does not target, so a switch costs
microseconds whatever the model's size. Adapters may differ in rank, alpha and target modules. For
inference and evaluation: the tensors are not trained (train a new adapter with `lorafuse train`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from .lora import ADAPTER_WEIGHTS, PEFT_PREFIX, LoraLinear, lora_modules, read_adapter_config


@dataclass
class _Loaded:
    path: str
    r: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (lora_A [r, in], lora_B [out, r])


class Adapters:
    """The named adapters loaded on one model (load_adapters), and which one is active."""

    def __init__(self, model):
        self.model = model
        self._loaded: dict[str, _Loaded] = {}
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._loaded)

    def path(self, name: str) -> str:
        return self._loaded[name].path

    def add(self, name: str, adapter_dir: str | Path) -> None:
        """Read a PEFT-format adapter directory and make it available as `name` (not active yet)."""
        if not name or name in self._loaded:
            raise ValueError(f"adapter name {name!r} is empty or already taken ({', '.join(self._loaded)})")
        cfg = read_adapter_config(adapter_dir)
        weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
        if not weights_path.is_file():
            raise ValueError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
        state = load_file(str(weights_path))
        device = next(self.model.parameters()).device
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in state:  # everything is checked before the model changes
            if not key.endswith((".lora_A.weight", ".lora_B.weight")) or not key.startswith(PEFT_PREFIX):
                raise ValueError(f"{weights_path}: unexpected key {key} (not a LoRA A/B weight)")
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
            b_key = f"{PEFT_PREFIX}{module}.lora_B.weight"
            if b_key not in state:
                raise ValueError(f"{weights_path}: {key} has no {b_key}")
            target = self._projection(module, weights_path)
            lora_a, lora_b = state[key], state[b_key]
            if lora_a.shape != (cfg.r, target.in_features) or lora_b.shape != (target.out_features, cfg.r):
                raise ValueError(f"{weights_path}: {module} has A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}; "
                                 f"the model's projection is {target.in_features} -> {target.out_features} at "
                                 f"r={cfg.r}")
            pairs[module] = (lora_a.to(device, torch.float32), lora_b.to(device, torch.float32))
        if not pairs:
            raise ValueError(f"{weights_path}: no LoRA weights")
        for module in pairs:
            self._slot(module)
        scaling = cfg.alpha / (cfg.r ** 0.5 if cfg.use_rslora else cfg.r)
        self._loaded[name] = _Loaded(str(adapter_dir), cfg.r, scaling, pairs)
        self.use(self.active)  # projections wrapped for this adapter stay off until it is used

    def _projection(self, module: str, weights_path: Path) -> nn.Linear | LoraLinear:
        try:
            found = self.model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"{weights_path}: module {module} is not in the model (another base model?)") from None
        if not isinstance(found, (nn.Linear, LoraLinear)):
            raise ValueError(f"{weights_path}: module {module} is a {type(found).__name__}, not a linear projection")
        return found

    def _slot(self, module: str) -> LoraLinear:
        """The LoraLinear at a module path, wrapping the nn.Linear there the first time."""
        found = self.model.get_submodule(module)
        if isinstance(found, LoraLinear):
            return found
        slot = LoraLinear(found, r=1, alpha=1.0)
        slot.lora_A.requires_grad_(False)
        slot.lora_B.requires_grad_(False)
        parent, _, leaf = module.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, leaf, slot)
        return slot

    def use(self, name: str | None) -> None:
        """Make adapter `name` active (None: the base model, every adapter off)."""
        if name is not None and name not in self._loaded:
            raise KeyError(f"no adapter named {name!r}; loaded: {', '.join(self._loaded) or 'none'}")
        chosen = self._loaded.get(name) if name is not None else None
        for path, module in lora_modules(self.model).items():
            pair = chosen.weights.get(path) if chosen else None
            module.enabled = pair is not None
            if pair is not None:
                # point the module's parameters at this adapter's tensors: no copy, nothing else changes
                module.lora_A.data, module.lora_B.data = pair
                module.r, module.scaling = chosen.r, chosen.scaling
        self.active = name

    @contextmanager
    def using(self, name: str | None):
        """Adapter `name` active inside the block, the previous one after it."""
        previous = self.active
        self.use(name)
        try:
            yield self
        finally:
            self.use(previous)


def load_adapters(model, adapters: dict[str, str | Path] | list[str | Path]) -> Adapters:
    """Load several PEFT-format adapters on one model (an HF causal LM of a supported family), each under a
    name (a list names each by its directory's name); none is active until `Adapters.use(name)`."""
    if not isinstance(adapters, dict):
        adapters = dict(zip(adapter_names([str(a) for a in adapters]), adapters))
    loaded = Adapters(model)
    for name, path in adapters.items():
        loaded.add(name, path)
    return loaded


def adapter_names(paths: list[str]) -> list[str]:
    """A short distinct name per adapter directory: its own name, with its parents' while two are alike
    (runs/a/best and runs/b/best are a/best and b/best)."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            return names if len(set(names)) == len(names) else [str(p) for p in paths]
        depth += 1
