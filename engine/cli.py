"""The `lorafuse` command: train, eval, data check, merge, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXAMPLE_CONFIG = """\
model: PATH_TO_HF_DIR          # local HF directory: config.json, *.safetensors, tokenizer files
output_dir: runs/my-adapter
data: {train: train.jsonl, validation: val.jsonl}   # validation (and test) optional
lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
train: {epochs: 1, lr: 2.0e-4, max_tokens_per_step: 4096, max_seq_len: 1024, seed: 0, eval_every: 50, save_every: 100}
"""


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, resume=args.resume)
    return 0


def cmd_eval(args) -> int:
    from .config import LoraConfig
    from .data import encode_all, read_jsonl
    from .evaluate import evaluate_loss, exact_match, generate_answers, prompt_and_answer
    from .lora import load_adapter
    from .model import load_model, load_tokenizer, resolve_device, resolve_dtype
    from .packing import pack
    from .prepare import prepare_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.model)
    examples, report = read_jsonl(args.data, "skip" if args.skip_invalid else "stop")
    docs, enc = encode_all(tokenizer, examples, args.max_seq_len, "truncate", "assistant", args.data)
    print(f"[data] {args.data}: {enc.summary(args.max_seq_len)}")
    model = load_model(args.model, dtype, device)
    lora: LoraConfig | None = load_adapter(model, args.adapter) if args.adapter else None
    result = {"model": args.model, "adapter": args.adapter, "data": args.data}
    result.update(evaluate_loss(prepare_model(model, stack_projections=False), pack(docs, max(args.max_seq_len, 4096))))
    print(f"[eval] loss {result['loss']:.4f}  perplexity {result['ppl']:.3f}  over {result['target_tokens']} "
          f"target tokens" + (f"  (adapter r={lora.r})" if lora else ""))
    if args.generate:
        predictions = generate_answers(model, tokenizer, examples, args.max_new_tokens)
        references = [prompt_and_answer(ex, tokenizer)[1] for ex in examples]
        result["exact_match"] = exact_match(predictions, references)
        print(f"[eval] exact match {result['exact_match']:.1%} of {len(examples)} examples")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_data_check(args) -> int:
    from .data import encode_all, read_jsonl

    examples, report = read_jsonl(args.file, "skip")
    forms = ", ".join(f"{n} {form}" for form, n in report.forms.items())
    print(f"{args.file}: {report.lines} lines, {report.examples} valid examples ({forms}), "
          f"{len(report.errors)} invalid, {report.blank} blank")
    for err in report.errors[:50]:
        print(f"  {err}")
    if len(report.errors) > 50:
        print(f"  ... and {len(report.errors) - 50} more")
    if args.model and examples:
        from .model import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        _, enc = encode_all(tokenizer, examples, args.max_seq_len, args.overlong, "assistant", args.file)
        print(f"tokens (tokenizer of {args.model}): {enc.summary(args.max_seq_len)}")
    return 1 if report.errors else 0


def cmd_merge(args) -> int:
    import torch

    from .lora import load_adapter, merge_lora
    from .model import load_model, load_tokenizer, read_config

    # "auto" keeps the dtype the base model was saved in.
    saved = read_config(args.model)
    name = args.dtype if args.dtype != "auto" else saved.get("dtype") or saved.get("torch_dtype") or "float32"
    model = load_model(args.model, getattr(torch, name), torch.device("cpu"))
    load_adapter(model, args.adapter)
    n = merge_lora(model)
    model.save_pretrained(args.out, safe_serialization=True)
    load_tokenizer(args.model).save_pretrained(args.out)
    print(f"merged {n} adapted projections into {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .demo.run import run_demo

    run_demo(Path(args.out), quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafuse", description="LoRA fine-tuning on fused Triton kernels.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune with LoRA from a YAML config",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a local HF model with LoRA.\n\nA config looks like:\n\n" + EXAMPLE_CONFIG
                       + "\nEvery key of engine/config.py can be set, in the file or as key.sub=value arguments.")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="loss/perplexity (and exact-match accuracy) of a model or model+adapter")
    e.add_argument("--model", required=True, help="local HF model directory")
    e.add_argument("--adapter", help="adapter directory (PEFT format); omit to evaluate the base model")
    e.add_argument("--data", required=True, help="JSONL file (chat or prompt/completion)")
    e.add_argument("--generate", action="store_true", help="also generate answers greedily and score exact match")
    e.add_argument("--max-seq-len", type=int, default=2048)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--skip-invalid", action="store_true", help="skip invalid lines instead of refusing the file")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    e.add_argument("--json", help="also write the results to this JSON file")
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="validate a JSONL file; with --model also count tokens")
    dc.add_argument("file")
    dc.add_argument("--model", help="model directory whose tokenizer (and chat template) to use")
    dc.add_argument("--max-seq-len", type=int, default=1024)
    dc.add_argument("--overlong", default="truncate", choices=["truncate", "drop"])
    dc.set_defaults(fn=cmd_data_check)

    m = sub.add_parser("merge", help="merge an adapter into its base model and save the result")
    m.add_argument("--model", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    m.set_defaults(fn=cmd_merge)

    demo = sub.add_parser("demo", help="build a small model locally, fine-tune it on support tickets, compare")
    demo.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    demo.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    from .config import ConfigError
    from .data import DataError
    from .model import ModelError
    from .train import TrainingStopped

    try:
        return args.fn(args)
    except TrainingStopped as e:
        print(f"lorafuse: stopped: {e}", file=sys.stderr)
        return 3
    except (ConfigError, DataError, ModelError, ValueError, FileNotFoundError) as e:
        print(f"lorafuse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorafuse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
