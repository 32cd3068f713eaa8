"""`lorafuse demo`: the whole product on a laptop-sized problem, with nothing downloaded.

1. build a tokenizer and a small Llama-architecture model from bundled text, and pre-train it
   briefly so it knows the language (it never sees a category label);
2. write a deterministic support-ticket dataset (12 categories; train/validation/test JSONL);
3. fine-tune it with LoRA through the same `train` as `lorafuse train` (the config is saved);
4. compare base and fine-tuned on the held-out test split: exact-match accuracy and loss.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import yaml

from ..config import load_config
from ..data import read_jsonl
from ..evaluate import exact_match, generate_answers, prompt_and_answer
from ..lora import adapters_disabled
from ..model import load_model, load_tokenizer
from ..train import train
from .base_model import build_model, build_tokenizer, pretrain, tiny_config
from .tickets import pretraining_text, write_dataset

FULL = {
    "vocab": 1024, "hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 384,
    "pretrain_steps": 120, "data": {"train": 1200, "validation": 120, "test": 240}, "epochs": 3,
}
QUICK = {
    "vocab": 400, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128,
    "pretrain_steps": 10, "data": {"train": 96, "validation": 24, "test": 24}, "epochs": 1,
}


def build_base(base_dir: Path, size: dict, log) -> None:
    """Tokenizer + model + short pre-training, reused when base_dir already holds this recipe."""
    recipe = json.dumps({k: size[k] for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "intermediate",
                                              "pretrain_steps")}, sort_keys=True)
    stamp = base_dir / "lorafuse_demo_recipe.json"
    if stamp.is_file() and stamp.read_text() == recipe:
        log(f"[1/4] base model: reusing {base_dir}")
        return
    t0 = time.perf_counter()
    texts = pretraining_text()
    base_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts, size["vocab"], base_dir)
    config = tiny_config("llama", vocab_size=len(tokenizer), hidden=size["hidden"], layers=size["layers"],
                         heads=size["heads"], kv_heads=size["kv_heads"], intermediate=size["intermediate"],
                         max_positions=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = build_model(config, base_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[1/4] base model: Llama architecture, {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}; "
        f"pre-training on {len(texts)} bundled texts (no labels)")
    pretrain(base_dir, texts, tokenizer, steps=size["pretrain_steps"], log=log)
    stamp.write_text(recipe)
    log(f"      done in {time.perf_counter() - t0:.0f}s")


def accuracy_and_answers(model, tokenizer, test_path: Path) -> tuple[float, list[str]]:
    examples, _ = read_jsonl(test_path)
    predictions = generate_answers(model, tokenizer, examples, max_new_tokens=16)
    references = [prompt_and_answer(ex, tokenizer)[1] for ex in examples]
    return exact_match(predictions, references), predictions


def run_demo(out: Path, quick: bool = False, log=print) -> dict:
    t_start = time.perf_counter()
    size = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "base-model"
    build_base(base_dir, size, log)

    paths = write_dataset(out / "data", seed=0, sizes=size["data"])
    log(f"[2/4] dataset: support tickets in 12 categories -> {out / 'data'} "
        + ", ".join(f"{k} {v}" for k, v in size["data"].items()))

    config = {
        "model": str(base_dir),
        "output_dir": str(out / "adapter"),
        "data": {"train": str(paths["train"]), "validation": str(paths["validation"]), "test": str(paths["test"])},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"epochs": size["epochs"], "lr": 5e-3, "warmup_steps": 10, "max_tokens_per_step": 1024,
                  "max_seq_len": 256, "eval_every": 10 if quick else 100, "save_every": 0, "seed": 0,
                  "log_every": 50},
    }
    config_path = out / "demo_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log(f"[3/4] fine-tuning with LoRA (config: {config_path}; rerun it with `lorafuse train {config_path}`)")
    result = train(load_config(config_path), log=log)

    log("[4/4] held-out test: base vs fine-tuned (greedy decoding, exact match of the category)")
    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir, torch.float32, torch.device("cpu"))
    from ..lora import load_adapter

    load_adapter(model, out / "adapter")
    with adapters_disabled(model):
        base_acc, _ = accuracy_and_answers(model, tokenizer, paths["test"])
    tuned_acc, predictions = accuracy_and_answers(model, tokenizer, paths["test"])
    summary = {
        "test_examples": size["data"]["test"],
        "base": {"accuracy": base_acc, "loss": result.test["base"]["loss"]},
        "finetuned": {"accuracy": tuned_acc, "loss": result.test["finetuned"]["loss"]},
        "train_steps": result.steps,
        "seconds": round(time.perf_counter() - t_start, 1),
        "command": "lorafuse demo" + (" --quick" if quick else ""),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu_threads": torch.get_num_threads(), "machine": platform.machine()},
        "sample_predictions": predictions[:5],
    }
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    log("")
    log(f"  {'':22}{'base':>10}{'fine-tuned':>14}")
    log(f"  {'test accuracy':22}{base_acc:>10.1%}{tuned_acc:>14.1%}")
    log(f"  {'test loss (answer)':22}{summary['base']['loss']:>10.3f}{summary['finetuned']['loss']:>14.3f}")
    log("")
    log(f"  adapter: {out / 'adapter'}  (PEFT format: PeftModel.from_pretrained(base, that_dir))")
    log(f"  loss curves: {out / 'adapter' / 'loss.png'};  per-step metrics: {out / 'adapter' / 'metrics.jsonl'}")
    log(f"  results: {out / 'demo_results.json'};  total {summary['seconds']:.0f}s")
    return summary
