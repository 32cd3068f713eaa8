"""lorafuse: LoRA fine-tuning on fused Triton kernels.

The public Python API (README.md, "Python API"): what higher-level tools call instead of the CLI.

    import lorafuse
    result = lorafuse.train(lorafuse.load_config("run.yaml"))     # the same run as `lorafuse train run.yaml`
    lorafuse.patch(peft_model)                                    # HF Trainer / TRL on lorafuse's kernels
    adapters = lorafuse.load_adapters(model, {"a": "runs/a", "b": "runs/b"}); adapters.use("b")   # one per task

`lorafuse.kernels` holds the ops (fused LoRA matmul, linear cross-entropy, varlen attention, ...);
`lorafuse.engine` holds data, model patching, LoRA, the training loop and the CLI.

Every name is imported on first use (module __getattr__), so `import lorafuse` imports neither torch nor
triton: a caller (the test suite's conftest) can still set TRITON_INTERPRET before triton is loaded.
"""

__version__ = "0.1.0"

# name -> (module, attribute); None: the module itself
_API = {
    "Config": ("lorafuse.engine.config", "Config"),
    "ConfigError": ("lorafuse.engine.config", "ConfigError"),
    "load_config": ("lorafuse.engine.config", "load_config"),
    "train": ("lorafuse.engine.train", "train"),
    "TrainResult": ("lorafuse.engine.train", "TrainResult"),
    "TrainingStopped": ("lorafuse.engine.train", "TrainingStopped"),
    "TrainingInterrupted": ("lorafuse.engine.train", "TrainingInterrupted"),
    "evaluate": ("lorafuse.engine.evaluate", "evaluate"),
    "merge": ("lorafuse.engine.merge", "merge"),
    "compare": ("lorafuse.engine.compare", "compare"),
    "load_adapters": ("lorafuse.engine.adapters", "load_adapters"),
    "Adapters": ("lorafuse.engine.adapters", "Adapters"),
    "import_gguf": ("lorafuse.engine.gguf_import", "import_gguf"),
    "patch": ("lorafuse.engine.patch", "patch"),
    "unpatch": ("lorafuse.engine.patch", "unpatch"),
    "is_patched": ("lorafuse.engine.patch", "is_patched"),
    "PatchError": ("lorafuse.engine.patch", "PatchError"),
    "kernels": ("lorafuse.kernels", None),
    "lora_linear": ("lorafuse.kernels", "lora_linear"),
    "fused_linear_cross_entropy": ("lorafuse.kernels", "fused_linear_cross_entropy"),
    "varlen_attention": ("lorafuse.kernels", "varlen_attention"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")
    import importlib

    module_name, attribute = _API[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
