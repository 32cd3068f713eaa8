"""Run configuration: plain dataclasses, read from YAML, overridden by `key.sub=value` arguments.

Unknown keys and values of the wrong type are errors that name the key, so a typo never
silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_MAX_SEQ_LEN = 1024  # train, eval and data check share it
TRACKERS = ("tensorboard", "wandb", "mlflow")  # train.report_to (tracking.py)
QUANTIZE = ("none", "nf4")  # quantize (quantize.py)


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


@dataclass
class DataChecks:
    duplicates: str = "warn"  # warn | refuse | off: the same example twice in one split (normalised text)
    near_duplicates: str = "warn"  # examples of one split whose word 3-shingles overlap >= 80% (MinHash, verified)
    conflicts: str = "warn"  # the same prompt with different answers
    validation_leakage: str = "warn"  # validation examples that occur in train, exactly or nearly
    test_leakage: str = "refuse"  # test examples that occur in train, exactly or nearly
    pii: str = "warn"  # e-mail, phone, card (Luhn), IBAN (mod 97), IP addresses, API and private keys
    size: str = "warn"  # fewer than 50 training examples
    overlong: str = "warn"  # examples over train.max_seq_len tokens


@dataclass
class MixSource:
    path: str = ""  # JSONL file whose examples join the training split
    fraction: float = 0.0  # share of each epoch's training examples drawn from it (seeded, fresh per epoch)


@dataclass
class DataConfig:
    train: str = ""  # JSONL file to train on: chat ({"messages": [...]}) or prompt/completion lines
    validation: str | None = None  # JSONL file for the validation loss (early stopping, best/)
    test: str | None = None  # JSONL file for the held-out base vs fine-tuned comparison at the end
    validation_fraction: float = 0.0  # without a validation file: this fraction of train, carved out (seeded)
    test_fraction: float = 0.0  # without a test file: this fraction of train, carved out (seeded)
    on_error: str = "stop"  # stop: refuse a file with any bad line | skip: drop bad lines, count them
    overlong: str = "truncate"  # truncate | drop: examples longer than train.max_seq_len
    train_on: str = "assistant"  # assistant: loss on assistant tokens only | all: every token
    checks: DataChecks = field(default_factory=DataChecks)  # data.checks.<kind>: warn | refuse | off
    mix: list[MixSource] = field(default_factory=list)  # other files mixed into train: [{path: ..., fraction: 0.1}]


@dataclass
class LoraConfig:
    r: int = 16  # rank of each adapter
    alpha: float = 32.0  # scaling alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the adapter's input (> 0 runs unfused PyTorch ops for the adapters)
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))  # projections with adapters
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    init_adapter: str | None = None  # start from this adapter (PEFT format, same r and targets), not a fresh init


@dataclass
class TrainConfig:
    epochs: int = 1  # passes over the training data
    max_steps: int = 0  # > 0 stops after this many optimizer steps
    lr: float = 2.0e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = -1  # linear warmup steps before the cosine decay (-1: from warmup_ratio)
    warmup_ratio: float = 0.03  # warmup as a share of the run's steps (at least one), unless warmup_steps >= 0
    weight_decay: float = 0.0  # AdamW weight decay of the LoRA weights
    max_grad_norm: float = 1.0  # gradient clipping (0 disables clipping)
    max_tokens_per_step: int = 4096  # token budget of one packed micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN  # longer examples are truncated or dropped (data.overlong)
    seed: int = 0  # seeds the adapters' init, the splits and the packing order
    eval_every: int = 50  # optimizer steps between validation passes (0: only at the end)
    save_every: int = 100  # optimizer steps between checkpoints to resume from (0: only at the end)
    early_stopping_patience: int = 0  # validation passes without improvement before stopping (0: never)
    log_every: int = 10  # steps between log lines when there is no progress bar (not a terminal)
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attention: str = "auto"  # auto (= triton) | triton | flash_attn | torch_varlen | sdpa (per-document reference)
    kernels: str = "auto"  # auto | reference: every op's PyTorch reference instead of Triton (debugging)
    lora_gemm: str = "auto"  # auto | triton | cublas: LoRA projections on Triton or cuBLAS GEMMs (auto: measured)
    checkpointing: str = "none"  # none | recompute | offload (per decoder layer; offload spares the last layer)
    memory_budget_gb: float = 0.0  # > 0: pick keep / recompute / offload per layer to fit this much GPU memory
    parallel: str = "ddp"  # ddp: a full model per rank | fsdp: base and LoRA sharded over the ranks (FSDP2)
    progress: bool = True  # tqdm progress bar
    report_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard | wandb | mlflow (extras)


@dataclass
class EvalConfig:
    general: str | None = None  # JSONL of prompts outside the task: the fine-tuned model's answers vs the base's
    general_max_change: float = 0.1  # warn when it prefers another token at more than this share of base answers
    max_new_tokens: int = 48  # tokens generated per general answer


@dataclass
class Config:
    model: str = ""  # local HuggingFace model directory (config.json, *.safetensors, tokenizer files)
    quantize: str = "none"  # none | nf4: the decoder's frozen projections in 4-bit NF4 (QLoRA, bitsandbytes' format)
    output_dir: str = "runs/lorafuse"  # adapter, checkpoints, metrics.jsonl, loss.png
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # the forgetting check at the end of training


CHECK_LEVELS = ("warn", "refuse", "off")
_CHOICES = {
    "data.on_error": ("stop", "skip"),
    "data.overlong": ("truncate", "drop"),
    "data.train_on": ("assistant", "all"),
    "train.dtype": ("auto", "bfloat16", "float16", "float32"),
    "train.attention": ("auto", "triton", "flash_attn", "torch_varlen", "sdpa"),
    "train.kernels": ("auto", "reference"),
    "train.lora_gemm": ("auto", "triton", "cublas"),
    "train.checkpointing": ("none", "recompute", "offload"),
    "train.parallel": ("ddp", "fsdp"),
}


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is a fine float (lr: 1 is a valid, if odd, learning rate)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _list_item(tp):
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _yaml_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _fill(obj, values: dict, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}' (known here: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, path + ".")
            continue
        tp = hints[key]
        item = _list_item(tp)
        if dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                keys = ", ".join(f.name for f in dataclasses.fields(item))
                raise ConfigError(f"config key '{path}' must be a list of mappings (keys {keys}), got {value!r}")
            entries = [item() for _ in value]
            for i, (entry, given) in enumerate(zip(entries, value)):
                _fill(entry, given, f"{path}[{i}].")
            setattr(obj, key, entries)
            continue
        if tp is float and isinstance(value, str):
            value = _yaml_float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        if not _type_ok(value, tp):
            raise ConfigError(f"config key '{path}' must be {_type_name(tp)}, got {value!r}")
        if isinstance(value, int) and tp is float:
            value = float(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{path}' must be a finite number, got {value}")
        setattr(obj, key, value)


def validate(cfg: Config) -> Config:
    for path, choices in _CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"config key '{path}' must be one of {', '.join(choices)}; got {value!r}")
    if cfg.quantize not in QUANTIZE:
        raise ConfigError(f"config key 'quantize' must be one of {', '.join(QUANTIZE)}; got {cfg.quantize!r}")
    if cfg.quantize != "none" and cfg.train.parallel == "fsdp":
        raise ConfigError("config keys 'quantize: nf4' and 'train.parallel: fsdp' do not combine yet (FSDP would "
                          "shard the packed 4-bit bytes, not weights); use train.parallel=ddp for QLoRA")
    if cfg.train.lora_gemm == "cublas":  # kernels/lora_cublas.py reads dense, whole weights
        clash = {"quantize": (cfg.quantize != "none", "NF4 weights"),
                 "train.parallel": (cfg.train.parallel == "fsdp", "FSDP shards"),
                 "train.kernels": (cfg.train.kernels == "reference", "the reference ops")}
        for key, (bad, what) in clash.items():
            if bad:
                raise ConfigError(f"config key 'train.lora_gemm: cublas' does not combine with '{key}' ({what}): "
                                  "its [W | B] buffers need dense, whole weights; use train.lora_gemm=triton or auto")
    t, lo = cfg.train, cfg.lora
    positive = {"lora.r": lo.r, "train.max_tokens_per_step": t.max_tokens_per_step,
                "train.max_seq_len": t.max_seq_len, "train.grad_accum": t.grad_accum, "train.epochs": t.epochs,
                "train.log_every": t.log_every}
    for path, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{path}' must be at least 1, got {value}")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {lo.dropout}")
    if t.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be positive, got {t.lr}")
    if t.max_seq_len > t.max_tokens_per_step:
        raise ConfigError(
            f"train.max_seq_len ({t.max_seq_len}) exceeds train.max_tokens_per_step ({t.max_tokens_per_step}): "
            "one example must fit in one packed micro-batch")
    for path in ("data.validation_fraction", "data.test_fraction"):
        value = getattr(cfg.data, path.split(".")[1])
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"config key '{path}' must be in [0, 1), got {value}")
    if not lo.target_modules:
        raise ConfigError("config key 'lora.target_modules' must name at least one module")
    if t.warmup_steps < -1:
        raise ConfigError(f"config key 'train.warmup_steps' must be -1 (from warmup_ratio) or more, got "
                          f"{t.warmup_steps}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"config key 'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
    _validate_data_gate(cfg.data)
    if not 0.0 <= cfg.eval.general_max_change <= 1.0:
        raise ConfigError(f"config key 'eval.general_max_change' must be in [0, 1], got {cfg.eval.general_max_change}")
    if cfg.eval.max_new_tokens < 1:
        raise ConfigError(f"config key 'eval.max_new_tokens' must be at least 1, got {cfg.eval.max_new_tokens}")
    unknown = [name for name in t.report_to if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"config key 'train.report_to' must list some of {', '.join(TRACKERS)}; got {unknown}")
    return cfg


def _validate_data_gate(d: DataConfig) -> None:
    for kind, level in dataclasses.asdict(d.checks).items():
        if level not in CHECK_LEVELS:
            raise ConfigError(f"config key 'data.checks.{kind}' must be one of {', '.join(CHECK_LEVELS)}; "
                              f"got {level!r}")
    for i, source in enumerate(d.mix):
        if not source.path:
            raise ConfigError(f"config key 'data.mix[{i}].path' is required: the path of a JSONL file")
        if not 0.0 < source.fraction < 1.0:
            raise ConfigError(f"config key 'data.mix[{i}].fraction' must be in (0, 1), got {source.fraction}")
    if (total := sum(s.fraction for s in d.mix)) >= 1.0:
        raise ConfigError(f"config key 'data.mix': the fractions add up to {total:g}; they must leave a share "
                          "for data.train (sum below 1)")


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Build a Config from a YAML file (or `base` dict) and `key.sub=value` overrides."""
    values: dict = dict(base or {})
    if path is not None:
        if Path(path).is_dir():
            raise ConfigError(f"{path} is a directory; expected a YAML config file")
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        values.update(loaded)
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{k}' is not a section")
        node[keys[-1]] = value
    cfg = Config()
    _fill(cfg, values, "")
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def describe_keys() -> list[str]:
    """Every config key with its default and what it does (from the comments above), for --help."""
    lines = []
    for section, cls in (("", Config), ("data.", DataConfig), ("data.checks.", DataChecks), ("data.mix[].", MixSource),
                         ("lora.", LoraConfig), ("train.", TrainConfig), ("eval.", EvalConfig)):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # no source shipped: keys and defaults only
            source = ""
        comments = dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.*)$", source, re.MULTILINE))
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                continue
            shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
            lines.append(f"  {section}{f.name} = {shown}".ljust(36) + f"  {comments.get(f.name, '')}".rstrip())
    return lines
