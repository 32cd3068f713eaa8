"""The training loop. Read it top to bottom: data, model, optimizer, the step loop, the end.

One optimizer step = `grad_accum` packed micro-batches (times the ranks when data-parallel), run by
step.train_step: the gradient is the mean over every trained token of the step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .activations import make_checkpointer
from .config import Config
from .data import encode_all, read_jsonl, split_examples
from .data_checks import Source, gate
from .distributed import all_ranks_true, barrier, device_mesh, init_distributed, local, shutdown
from .evaluate import evaluate_loss
from .faults import crash_point
from .forgetting import forgetting_check, read_general
from .guard import CollapseWatch, LastGood, OverfitWatch, finite_after_update
from .interrupt import stop_signals
from .lora import (
    adapters_disabled,
    inject_lora,
    load_adapter_weights,
    lora_parameters,
    read_adapter_config,
    save_adapter,
)
from .manifest import final_metrics, run_manifest
from .metrics import (
    MetricsLog,
    causal_attention_flops,
    matmul_parameters,
    peak_matmul_flops,
    plot_losses,
    training_flops,
)
from .mixing import Mixture
from .model import (
    check_supported,
    count_parameters,
    custom_code_notes,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from .packing import PackedBatch, pack
from .prepare import prepare_model
from .quantize import describe_weights, frozen_weight_bytes
from .sharded_load import load_sharded
from .step import train_step
from .tracking import check_trackers, open_trackers
from .train_checkpoints import (
    TrainerState,
    check_output_dir,
    drop_checkpoints_after,
    find_resume_point,
    finish_run_file,
    load_checkpoint,
    new_run_id,
    run_identity,
    save_checkpoint,
    start_run_files,
)


class TrainingStopped(RuntimeError):
    """Training stopped because it went wrong (non-finite, collapsed); the message says what was kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint after the step in progress and stopped."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted after step {step}; checkpoint saved in {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainResult:
    steps: int = 0
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    best_val_loss: float | None = None
    test: dict = field(default_factory=dict)  # {"base": {...}, "finetuned": {...}}
    general: dict | None = None  # the forgetting check (eval.general): forgetting.forgetting_check's result
    output_dir: str = ""
    stopped_early: bool = False


def load_datasets(cfg: Config, tokenizer, log) -> dict:
    """Tokenized documents per split ("train", and "validation"/"test" when there are any), through the data
    gate (data_checks: refuses or warns per data.checks); with data.mix also "mix", the Mixture that joins
    the training split each epoch."""
    d, t = cfg.data, cfg.train
    if not d.train:
        raise ValueError("config key 'data.train' is required: the path of a JSONL file")
    examples = {"train": read_jsonl(d.train, d.on_error)}
    for split in ("validation", "test"):
        if getattr(d, split):
            examples[split] = read_jsonl(getattr(d, split), d.on_error)
    mixed = [(m, read_jsonl(m.path, d.on_error)) for m in d.mix]
    for _, report in [*examples.values(), *(read for _, read in mixed)]:
        if report.bom:
            log(f"[data] {report.path}: starts with a UTF-8 byte order mark (ignored)")
        if report.errors:
            log(f"[data] {report.path}: skipped {len(report.errors)} invalid line(s) (data.on_error=skip); "
                f"first: {report.errors[0]}")
    carve = [(s, getattr(d, f"{s}_fraction")) for s in ("validation", "test")
             if s not in examples and getattr(d, f"{s}_fraction") > 0]
    if carve:
        rest, *parts = split_examples(examples["train"][0], [f for _, f in carve], seed=t.seed)
        examples["train"] = (rest, examples["train"][1])
        for (split, frac), part in zip(carve, parts):
            examples[split] = (part, None)
            log(f"[data] {split}: {len(part)} examples carved out of {d.train} ({frac:.0%}, seed {t.seed})")
    docs, sources = {}, []
    for name, (exs, report) in [*examples.items(), *((f"mix {m.path}", read) for m, read in mixed)]:
        path = report.path if report else d.train
        docs[name], enc = encode_all(tokenizer, exs, t.max_seq_len, d.overlong, d.train_on, path)
        log(f"[data] {name}: {enc.summary(t.max_seq_len)}")
        if not docs[name]:
            raise ValueError(f"{path}: no usable {name} examples after tokenization")
        split = "train" if name.startswith("mix ") else name  # mixed-in examples are training examples
        sources.append(Source(split, path, exs, enc.lengths, docs[name], name=name))
    gate(sources, d.checks, t.max_seq_len, log)
    if mixed:
        sources_docs = [(m.path, m.fraction, docs.pop(f"mix {m.path}")) for m, _ in mixed]
        docs["mix"] = Mixture.of(len(docs["train"]), sources_docs, t.seed)
        for line in docs["mix"].describe(len(docs["train"])):
            log(f"[data] {line}")
    return docs


def warmup_steps(total: int, cfg) -> int:
    """train.warmup_steps when set (>= 0), else train.warmup_ratio of the run's steps, at least one."""
    return cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, math.ceil(cfg.warmup_ratio * total))


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    warmup = warmup_steps(total, cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def plan_steps(docs, cfg, micro_per_step: int | None = None, mixture: Mixture | None = None,
               start: tuple[int, int] = (0, 0)) -> list[tuple[int, list[PackedBatch]]]:
    """Every optimizer step of the run as (epoch, micro-batches); each epoch is re-packed with its own seed
    (with data.mix, after this epoch's draw of the mixed-in files joins the documents), so the order of
    micro-batches does not depend on how many ranks run them. A step has grad_accum micro-batches (times
    the number of ranks when data-parallel). start=(epoch, micro-batches of it done): the rest of the run
    from there (a resumed run), cut at max_steps by the caller."""
    per_step = micro_per_step or cfg.grad_accum
    steps = []
    for epoch in range(start[0], cfg.epochs):
        epoch_docs = mixture.epoch(docs, epoch) if mixture else docs
        batches = pack(epoch_docs, cfg.max_tokens_per_step, seed=cfg.seed + epoch, shuffle=True)
        first = start[1] if epoch == start[0] else 0
        steps += [(epoch, batches[i:i + per_step]) for i in range(first, len(batches), per_step)]
    return steps[: cfg.max_steps] if cfg.max_steps > 0 and start == (0, 0) else steps


def train(cfg: Config, resume: bool = False, log=print, *, overwrite: bool = False, force: bool = False) -> TrainResult:
    """Fine-tune as `cfg` says. resume: continue from the newest checkpoint in output_dir (force: even one
    of another run); overwrite: replace another run's files in output_dir."""
    t, out = cfg.train, Path(cfg.output_dir)
    started = time.perf_counter()
    torch.manual_seed(t.seed)
    ctx, device = init_distributed(resolve_device(t.device), process_group=t.parallel == "fsdp")
    dtype = resolve_dtype(t.dtype, device)
    if not ctx.is_main:
        log = _quiet  # rank 0 speaks and writes for everyone

    # ---- check everything before writing anything: output directory, model, adapter, data
    check_output_dir(out, resume, overwrite)
    for note in custom_code_notes(check_supported(cfg.model)):
        log(f"[model] {note}")
    if cfg.lora.init_adapter:
        read_adapter_config(cfg.lora.init_adapter)
    if ctx.is_main:
        check_trackers(t.report_to)
    tokenizer = load_tokenizer(cfg.model)
    docs = load_datasets(cfg, tokenizer, log)
    general = read_general(cfg.eval.general) if cfg.eval.general else None
    identity = run_identity(cfg)
    resume_from = find_resume_point(out, identity, resume, overwrite, force, log)

    # ---- model: frozen base (NF4 with quantize: nf4), LoRA adapters in float32 (fsdp: each rank loads and keeps
    # its shards only)
    if t.parallel == "fsdp":
        model, prepared = load_sharded(cfg.model, dtype, device, cfg.lora, device_mesh(ctx, device),
                                       attention=t.attention, kernels=t.kernels)
    else:
        model = load_model(cfg.model, dtype, device, quantize=cfg.quantize)
        prepared = prepare_model(model, attention=t.attention, kernels=t.kernels, lora_gemm=t.lora_gemm)
        inject_lora(model, cfg.lora)
    if cfg.lora.init_adapter:
        load_adapter_weights(model, cfg.lora.init_adapter)
        log(f"[model] LoRA weights initialised from {cfg.lora.init_adapter}")
    if prepared.lora_gemm is not None:
        prepared.lora_gemm.attach(prepared)  # the cuBLAS path's [W | B] buffers, written once (lora_gemm.py)
    params = lora_parameters(model)
    n_frozen, n_lora = count_parameters(prepared.sharded or model)
    if prepared.sharded is None:
        weight_bytes, weights = frozen_weight_bytes(model), describe_weights(model, dtype)
    else:
        frozen = [p for p in prepared.sharded.parameters() if not p.requires_grad]
        weight_bytes = sum(p.numel() * p.element_size() for p in frozen)
        held = sum(local(p).numel() * p.element_size() for p in frozen)
        weights = f"fsdp over {ctx.world} rank(s): this rank holds {held / 2**20:.1f} MiB of the " \
                  f"{weight_bytes / 2**20:.1f} MiB of frozen weights"
    log(f"[model] {model.config.model_type} {n_frozen / 1e6:.1f}M frozen + {n_lora / 1e6:.2f}M LoRA parameters "
        f"(r={cfg.lora.r}, {len(cfg.lora.target_modules)} projections per layer), {dtype}, {device}, {weights}")
    if prepared.lora_gemm is not None:
        log(f"[kernels] LoRA GEMMs: {prepared.lora_gemm.note}")
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")

    # ---- the run: where it starts, its files
    state = TrainerState(step=0, run_id=new_run_id(), identity=identity, ranks=ctx.world)
    if resume_from is not None:
        state = load_checkpoint(model, optimizer, resume_from, device, ctx, prepared.sharded)
        state.identity = identity  # accepted as this run's (it differs only with --force)
        log(f"[train] resumed from {resume_from} at step {state.step}"
            + (f" (trained on {state.ranks} rank(s), now {ctx.world})" if state.ranks != ctx.world else ""))
    later = plan_steps(docs["train"], t, micro_per_step=t.grad_accum * ctx.world, mixture=docs.get("mix"),
                       start=(state.epoch, state.micro_in_epoch))
    if t.max_steps > 0:
        later = later[: max(0, t.max_steps - state.step)]
    total = state.step + len(later)
    steps = [None] * state.step + later  # steps[i] is step i; the done ones are not needed again
    barrier(ctx)  # every rank has checked the directory before rank 0 writes into it
    if ctx.is_main:
        manifest = run_manifest(cfg, identity, device, ctx.world)
        start_run_files(out, cfg, state, fresh=resume_from is None, manifest=manifest)
    metrics = MetricsLog(out / "metrics.jsonl", keep_lines=state.metrics_lines,
                         trackers=open_trackers(t.report_to, out, cfg)) if ctx.is_main else None
    val_batches = pack(docs["validation"], t.max_tokens_per_step) if "validation" in docs else None
    checkpointer = make_checkpointer(model, cfg, dtype, device, log, sharded=prepared.sharded)
    last_good = LastGood(params, optimizer)
    collapse = CollapseWatch(model.config.vocab_size)
    overfit = OverfitWatch()

    # where the data stands when step k starts: (epoch, its micro-batches done), kept for every step of this
    # process so a checkpoint (of this step, or of the last good one) can say where to go on from
    position_at = {state.step: (state.epoch, state.micro_in_epoch)}

    def checkpoint_now(step: int) -> Path:
        state.step, state.metrics_lines, state.ranks = step, metrics.lines if metrics else 0, ctx.world
        state.epoch, state.micro_in_epoch = position_at[step]
        return save_checkpoint(model, cfg, optimizer, state, out, ctx, prepared.sharded)

    def stop(kind: str, why: str, keep_last_good: bool = True):
        """Undo the update that went wrong (back to the last state whose loss was finite), save that, stop."""
        if not keep_last_good:
            where = "no adapter was saved (the checkpoints before, if any, are kept)"
        elif last_good.step is None:
            where = "nothing was saved: no step of this run had a finite loss before it"
        else:
            good = last_good.restore()
            where = f"the adapter of the last good step is in {checkpoint_now(good)}"
            # checkpoints saved since hold weights the bad update made (a huge but finite update shows only
            # at the next step): --resume must not pick them
            if ctx.is_main and (dropped := drop_checkpoints_after(out, good, state.run_id)):
                where += f" (removed {', '.join(p.name for p in dropped)}: saved after the update that went wrong)"
        if metrics:
            metrics.write({"step": step + 1, "stopped": kind, "reason": why})
        finish(f"stopped: {kind}")
        bar.close()
        shutdown(ctx)
        raise TrainingStopped(f"{why}; {where}")

    def finish(status: str) -> None:
        """run.json's final entry: how the run ended, what it reached; the metrics log and trackers closed."""
        done = start_step + len(result.train_losses)
        tokens = sum(b.num_tokens for _, micro in steps[start_step:done] for b in micro)
        if ctx.is_main:
            metrics.close()
            finish_run_file(out, final_metrics(result, status, time.perf_counter() - started, done, tokens))

    # ---- throughput accounting (DESIGN.md: 4 N_frozen + 6 N_lora per token, plus attention)
    n_matmul, spec = matmul_parameters(model), prepared.spec
    peak = peak_matmul_flops(device) if device.type == "cuda" else None
    result = TrainResult(output_dir=str(out))
    best = state.best_val_loss if state.best_val_loss is not None else math.inf
    log(f"[train] {total} steps of up to {t.grad_accum} x {t.max_tokens_per_step} tokens"
        + (f" on each of {ctx.world} ranks" if ctx.active else "") + f", {t.epochs} epoch(s), "
        f"{warmup_steps(total, t)} warmup step(s)")

    from tqdm.auto import tqdm

    show_bar = t.progress and ctx.is_main and sys.stderr.isatty()  # in a log file, plain lines read better
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step", disable=not show_bar, dynamic_ncols=True,
               mininterval=0.5)
    model.train()
    start_step = step = state.step
    with stop_signals(ctx, device, log) as interrupted:
        for step in range(start_step, total):
            t0 = time.perf_counter()
            lr = lr_at(step, total, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            epoch, micro = steps[step]
            at_epoch, done_in_epoch = position_at[step]
            position_at[step] = (epoch, done_in_epoch if epoch == at_epoch else 0)  # a new epoch starts at 0
            position_at[step + 1] = (epoch, position_at[step][1] + len(micro))
            step_targets = sum(b.num_target_tokens for b in micro)
            step_tokens = sum(b.num_tokens for b in micro)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

            # ---- forward and backward over this rank's share, all-reduce, clip, update if all is finite
            done = train_step(prepared, micro, optimizer, params, max_grad_norm=t.max_grad_norm,
                              checkpointer=checkpointer, ctx=ctx, last_good=last_good, step=step)
            loss_value, norm_value = done.loss, done.grad_norm
            if not done.applied:
                what = (f"loss {loss_value} / grad norm {norm_value} is" if done.weights_finite
                        else "the LoRA weights after the previous update are")
                stop("non-finite", f"step {step + 1}: {what} not finite; stopped before applying it")
            if collapse.collapsed(loss_value, norm_value):
                stop("collapsed", f"step {step + 1}: training collapsed: the loss has been ln(vocab) = "
                     f"{collapse.uniform_loss:.3f} (a uniform prediction) with no gradient for {collapse.patience} "
                     "steps; lower train.lr", keep_last_good=False)
            crash_point("step")

            # ---- log
            dt = time.perf_counter() - t0
            record = {"step": step + 1, "epoch": epoch, "loss": loss_value, "lr": lr,
                      "grad_norm": norm_value, "tokens": step_tokens, "target_tokens": step_targets,
                      "tokens_per_s": step_tokens / dt, "frozen_weight_bytes": weight_bytes}
            if device.type == "cuda":
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30  # this rank's
                lengths = [n for b in micro for n in b.doc_lengths]
                attention = sum(causal_attention_flops(lengths, spec.num_heads, spec.head_dim, 1, layer.window)
                                for layer in prepared.layers)
                record["mfu"] = training_flops(n_matmul, n_lora, step_tokens, attention) / dt / (peak * ctx.world)
            if metrics:
                metrics.write(record)
            result.train_losses.append(loss_value)
            overfit.train_loss(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if ((step + 1) % t.log_every == 0 or step == start_step) and not show_bar:
                log(_format_record(record))

            # ---- validate, save, stop early
            last = step + 1 == total
            if last and not all_ranks_true(finite_after_update(prepared, micro, params), ctx, device):
                stop("non-finite", f"step {step + 1}: the final update made the adapter evaluate non-finite")
            if val_batches and ((t.eval_every and (step + 1) % t.eval_every == 0) or last):
                val = evaluate_loss(prepared, val_batches, ctx)
                model.train()
                result.val_losses.append((step + 1, val["loss"]))
                if metrics:
                    metrics.write({"step": step + 1, "val_loss": val["loss"], "val_ppl": val["ppl"]})
                log_line = bar.write if ctx.is_main else _quiet
                log_line(f"[eval] step {step + 1}: validation loss {val['loss']:.4f} (ppl {val['ppl']:.2f})")
                if not math.isfinite(val["loss"]):
                    stop("non-finite", f"step {step + 1}: the validation loss is not finite")
                if warning := overfit.evaluated(val["loss"], t.early_stopping_patience, out / "best"):
                    log_line(f"[train] warning: {warning}")
                if val["loss"] < best:
                    best, state.best_val_loss, state.bad_evals = val["loss"], val["loss"], 0
                    save_adapter(model, cfg.lora, out / "best", cfg.model, write=ctx.is_main)
                else:
                    state.bad_evals += 1
                    if t.early_stopping_patience and state.bad_evals >= t.early_stopping_patience:
                        log_line(f"[train] early stop at step {step + 1}: no validation improvement in "
                                 f"{state.bad_evals} evaluations (best {best:.4f}, adapter in {out / 'best'})")
                        result.stopped_early = True
                        break
            if interrupted():
                saved = checkpoint_now(step + 1)
                finish("interrupted")
                bar.close()
                shutdown(ctx)
                raise TrainingInterrupted(step + 1, saved)
            if t.save_every and (step + 1) % t.save_every == 0 and not last:
                checkpoint_now(step + 1)
    bar.close()
    result.steps = step + 1 if total else 0
    result.best_val_loss = best if math.isfinite(best) else None

    # ---- the end: adapter, held-out comparison, plot
    save_adapter(model, cfg.lora, out, cfg.model, write=ctx.is_main)
    log(f"[train] adapter saved to {out} (adapter_config.json, adapter_model.safetensors)")
    if "test" in docs:
        test_batches = pack(docs["test"], t.max_tokens_per_step)
        with adapters_disabled(model):
            result.test["base"] = evaluate_loss(prepared, test_batches, ctx)
        result.test["finetuned"] = evaluate_loss(prepared, test_batches, ctx)
        b, f = result.test["base"], result.test["finetuned"]
        log(f"[test] loss base {b['loss']:.4f} (ppl {b['ppl']:.2f}) -> fine-tuned {f['loss']:.4f} (ppl {f['ppl']:.2f})")
    if general and ctx.is_main:  # generation is the same on every rank: the first one checks
        result.general = forgetting_check(prepared, tokenizer, general, max_new_tokens=cfg.eval.max_new_tokens,
                                          max_change=cfg.eval.general_max_change, log=log)
        (out / "forgetting.json").write_text(json.dumps(result.general, indent=2))
    if ctx.is_main:
        if result.test:
            (out / "eval_results.json").write_text(json.dumps(result.test, indent=2))
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    finish("early_stopped" if result.stopped_early else "finished")
    barrier(ctx)
    shutdown(ctx)
    return result


def _quiet(*args, **kwargs) -> None:
    pass


def _format_record(r: dict) -> str:
    parts = [f"step {r['step']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"grad_norm {r['grad_norm']:.3f}",
             f"{r['tokens_per_s']:.0f} tok/s"]
    if "mfu" in r:
        parts += [f"mfu {r['mfu']:.1%}", f"mem {r['peak_mem_gb']:.1f} GB"]
    return "[train] " + "  ".join(parts)
