"""Helpers shared by the engine tests."""

import json
import random
import shutil

from lorafuse.engine.config import load_config
from lorafuse.engine.demo.tickets import make_example

QUIET = lambda *a, **k: None  # noqa: E731 - a log function that says nothing


def write_jsonl(path, rows):
    """Write rows (dicts, or raw str/bytes lines) as a JSONL file; returns the path."""
    with open(path, "wb") as fh:
        for row in rows:
            if isinstance(row, bytes):
                fh.write(row + b"\n")
            elif isinstance(row, str):
                fh.write(row.encode() + b"\n")
            else:
                fh.write(json.dumps(row).encode() + b"\n")
    return path


def write_ticket_files(folder, sizes=(("train", 40), ("validation", 8), ("test", 8)), seed=1):
    """Support-ticket JSONL files (chat form) per split; returns {split: path}."""
    rng = random.Random(seed)
    cats = ["billing", "refund", "privacy", "cancellation"]
    rows = lambda n: [make_example(cats[i % 4], rng) for i in range(n)]  # noqa: E731
    return {split: write_jsonl(folder / f"{split}.jsonl", rows(n)) for split, n in sizes}


def tiny_train_config(model_dir, files, out, **train_overrides):
    """A Config for a few quick steps of the tiny model on the ticket files."""
    base = {"model": str(model_dir), "output_dir": str(out),
            "data": {k: str(v) for k, v in files.items()},
            "lora": {"r": 4, "alpha": 8},
            "train": {"lr": 2e-3, "warmup_steps": 1, "max_tokens_per_step": 640, "max_seq_len": 256,
                      "eval_every": 0, "save_every": 0, "progress": False, **train_overrides}}
    return load_config(None, base=base)


def llama_8b_dir(tiny_model_dir, path):
    """Llama-3.1-8B's config (its shapes) with the tiny model's tokenizer and no weights: what lorafuse plan reads."""
    shutil.copytree(tiny_model_dir, path, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=128256)
    (path / "config.json").write_text(json.dumps(config))
    return path


def reference_then_kernels(monkeypatch, reference_loss, loss, params):
    """The loss and gradients of `params` under LORAFUSE_KERNELS=reference, then under auto (reference_loss and loss
    are the calls to make): (ref_loss, ref_grads, loss, grads, ran), ran the kernel ops the auto run launched."""
    import torch

    from lorafuse.kernels._launch import launches

    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    ref = reference_loss()
    ref_grads = torch.autograd.grad(ref, params)
    monkeypatch.setenv("LORAFUSE_KERNELS", "auto")
    before = dict(launches)
    out = loss()
    grads = torch.autograd.grad(out, params)
    ran = {op for op, n in launches.items() if n > before.get(op, 0)}
    return ref, ref_grads, out, grads, ran
