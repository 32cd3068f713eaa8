"""Training checkpoints and the run they belong to: what `lorafuse train --resume` continues from.

OUTPUT_DIR/checkpoint-STEP holds the adapter (PEFT format), the optimizer state, and in
trainer_state.json the step, the run's identity, the best validation loss, the early-stopping
count and how many lines of metrics.jsonl the run had written (a resumed run cuts the file there,
so the steps it redoes are not listed twice). Each is written under a temporary name and renamed,
so a crash never leaves a broken one.

A run's identity is what decides which steps it trains: the model, the data files (their
contents), the data and LoRA settings, the packing (token budget, accumulation, sequence length,
seed) and the parallel mode. A checkpoint of another identity is refused on resume, naming what
differs. The number of ranks may change: a checkpoint records where the run was in the data (epoch
and micro-batch), and the run goes on from there with its steps grouped for the ranks it has now.
Optimisation settings (learning rate, schedule, clipping, evaluation and saving cadence,
checkpointing mode) may change on resume: lowering the learning rate after a divergence is the
point of resuming. OUTPUT_DIR/run.json records the identity of the run that owns the directory, and
its manifest (manifest.py: config, data and model fingerprints, versions, device, and at the end its
results).

Not to be confused with activation checkpointing (what backward recomputes): engine/activations/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import Config
from .distributed import DistContext, barrier
from .faults import crash_point
from .lora import load_adapter_weights, save_adapter

CHECKPOINTS_KEPT = 2
OPTIMIZER_STATE = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
RUN_FILE = "run.json"
# What a run writes into its output directory (anything else there is the user's and left alone).
RUN_ARTIFACTS = ("run.json", "config.yaml", "metrics.jsonl", "loss.png", "eval_results.json", "adapter_config.json",
                 "adapter_model.safetensors", "best")
IDENTITY_TRAIN_KEYS = ("max_tokens_per_step", "grad_accum", "max_seq_len", "seed")


class RunMismatch(ValueError):
    """A checkpoint or output directory of another run; the message names what differs."""


@dataclasses.dataclass
class TrainerState:
    step: int
    run_id: str
    identity: dict
    best_val_loss: float | None = None
    bad_evals: int = 0
    metrics_lines: int = 0
    epoch: int = 0  # where the run is in the data: the epoch, and the micro-batches of it already trained
    micro_in_epoch: int = 0
    ranks: int = 1  # how many ranks trained up to here


def run_identity(cfg: Config) -> dict:
    """What makes two runs train the same steps (module docstring)."""
    files = {split: getattr(cfg.data, split) for split in ("train", "validation", "test") if getattr(cfg.data, split)}
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in (*files, "checks", "mix")}
    if cfg.data.mix:  # the files by content, below; absent without mixing, as before data.mix existed
        data["mix"] = [m.fraction for m in cfg.data.mix]
        files.update({f"mix[{i}]": m.path for i, m in enumerate(cfg.data.mix)})
    quantized = {"quantize": cfg.quantize} if cfg.quantize != "none" else {}  # absent unquantized, as before
    return {"model": str(Path(cfg.model).resolve()), **quantized, "data": data,
            "data_files": {split: _sha256(path) for split, path in files.items()},
            "lora": {k: v for k, v in dataclasses.asdict(cfg.lora).items() if k != "init_adapter"},
            "train": {k: getattr(cfg.train, k) for k in IDENTITY_TRAIN_KEYS},
            "parallel": cfg.train.parallel}


def identity_differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: stored -> current' for every leaf that differs."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return out


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def write_run_file(out: Path, run_id: str, identity: dict, manifest: dict | None = None) -> None:
    _write_json_atomic(out / RUN_FILE, {"run_id": run_id, "identity": identity, **(manifest or {})})


def finish_run_file(out: Path, final: dict) -> None:
    """Add how the run ended, and its results, to run.json."""
    run = read_run_file(out) or {}
    _write_json_atomic(out / RUN_FILE, {**run, "final": final})


def read_run_file(out: Path) -> dict | None:
    path = out / RUN_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as another run's


def run_artifacts(out: Path) -> list[Path]:
    """The files and directories of a run in `out` (checkpoints included)."""
    if not out.is_dir():
        return []
    found = [out / name for name in RUN_ARTIFACTS if (out / name).exists()]
    return found + sorted(out.glob("checkpoint-*")) + sorted(out.glob(".checkpoint-*.tmp"))


def clear_run(out: Path) -> None:
    """Remove a run's files from `out` (--overwrite); other files stay."""
    for path in run_artifacts(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: output_dir can be written, and does not hold another run unless asked."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RunMismatch(f"output_dir {out}: {existing} is a file, not a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise RunMismatch(f"output_dir {out}: {existing} is not writable")
    if not (resume or overwrite) and (found := run_artifacts(out)):
        raise RunMismatch(f"output_dir {out} holds another run ({_names(found)}); choose another output_dir, "
                          "or pass --overwrite to replace it or --resume to continue it")


def find_resume_point(out: Path, identity: dict, resume: bool, overwrite: bool, force: bool, log) -> Path | None:
    """The checkpoint to resume from (None: start at step 0); refuses another run's checkpoint unless force."""
    if not resume:
        return None
    checkpoint = None
    for candidate in reversed(checkpoints(out)):
        if read_trainer_state(candidate) is not None:
            checkpoint = candidate
            break
        log(f"[train] --resume: {candidate} is incomplete (no readable {TRAINER_STATE}); skipped")
    if checkpoint is None:
        owner = read_run_file(out)
        if (found := run_artifacts(out)) and not overwrite and (owner or {}).get("identity") != identity:
            raise RunMismatch(f"--resume: output_dir {out} has no checkpoint, and its files ({_names(found)}) are "
                              "another run's; pass --overwrite to replace them")
        log(f"[train] --resume: no checkpoint in {out}; starting from step 0")
        return None
    state = read_trainer_state(checkpoint)
    differences = identity_differences(state.identity, identity)
    if differences and not force:
        raise RunMismatch(f"{checkpoint} is of another run: {'; '.join(differences)}. Pass --force to resume it "
                          "anyway, or start a new run in another output_dir")
    if differences:
        log(f"[train] --force: resuming {checkpoint} although {'; '.join(differences)}")
    return checkpoint


def start_run_files(out: Path, cfg: Config, state: TrainerState, fresh: bool, manifest: dict | None = None) -> None:
    """The run's own files, written once every check has passed: a fresh run first clears the files of
    the run it replaces (--overwrite, or --resume without a checkpoint)."""
    if fresh:
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    write_run_file(out, state.run_id, state.identity, manifest)


def save_checkpoint(model, cfg: Config, optimizer, state: TrainerState, out: Path, ctx: DistContext | None = None,
                    sharded=None) -> Path:
    """OUTPUT_DIR/checkpoint-STEP; keeps the newest CHECKPOINTS_KEPT of this run (never another run's).

    Every rank calls it. Unsharded, rank 0 writes the adapter and the optimizer state; sharded (fsdp),
    the adapter is gathered for rank 0 and the LoRA weights and optimizer state are written with
    torch.distributed.checkpoint, each rank its part. Each rank keeps its RNG state. Everything goes into
    a temporary directory that rank 0 renames once all have finished."""
    ctx = ctx or DistContext()
    final = out / f"checkpoint-{state.step}"
    tmp = out / f".checkpoint-{state.step}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    save_adapter(model, cfg.lora, tmp, cfg.model, write=ctx.is_main)
    crash_point("checkpoint")
    if sharded is not None:
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(sharded, optimizer), checkpoint_id=str(tmp / SHARDS))
    elif ctx.is_main:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_STATE)
    torch.save(_rng_state(), tmp / f"rng-{ctx.rank}.pt")
    barrier(ctx)
    if ctx.is_main:
        (tmp / TRAINER_STATE).write_text(json.dumps(dataclasses.asdict(state)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        ours = [p for p in checkpoints(out) if (s := read_trainer_state(p)) is not None and s.run_id == state.run_id]
        for old in ours[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


def drop_checkpoints_after(out: Path, step: int, run_id: str) -> list[Path]:
    """Remove this run's checkpoints of steps after `step` (they hold what a bad update made); returns them."""
    dropped = [p for p in checkpoints(out) if int(p.name.split("-", 1)[1]) > step
               and (s := read_trainer_state(p)) is not None and s.run_id == run_id]
    for path in dropped:
        shutil.rmtree(path, ignore_errors=True)
    return dropped


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-STEP directories, oldest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def read_trainer_state(checkpoint: Path) -> TrainerState | None:
    """The checkpoint's trainer state; None when it is missing or unreadable."""
    try:
        raw = json.loads((checkpoint / TRAINER_STATE).read_text())
        return TrainerState(**{f.name: raw[f.name] for f in dataclasses.fields(TrainerState) if f.name in raw})
    except (OSError, ValueError, TypeError):
        return None


def load_checkpoint(model, optimizer, checkpoint: Path, device: torch.device, ctx: DistContext | None = None,
                    sharded=None) -> TrainerState:
    """Restore the adapter, optimizer and RNG state of a checkpoint; returns its trainer state. A sharded
    checkpoint is read back on any number of ranks (torch.distributed.checkpoint reshards it)."""
    ctx = ctx or DistContext()
    state = read_trainer_state(checkpoint)
    if state is None:
        raise RunMismatch(f"{checkpoint}: no readable {TRAINER_STATE}; not a lorafuse checkpoint")
    if sharded is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        wanted = _sharded_state(sharded, optimizer)
        dcp.load(wanted, checkpoint_id=str(checkpoint / SHARDS))
        keys = set_state_dict(sharded, optimizer, model_state_dict=wanted["lora"], optim_state_dict=wanted["optim"],
                              options=_STATE_OPTIONS())
        missing = sorted({n for n, p in sharded.named_parameters() if p.requires_grad} & set(keys.missing_keys))
        if keys.unexpected_keys or missing:
            raise RunMismatch(f"{checkpoint}: its LoRA weights do not fit the model (missing {missing[:2]}, "
                              f"unexpected {keys.unexpected_keys[:2]})")
    else:
        load_adapter_weights(model, checkpoint)
        optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_STATE, map_location=device, weights_only=True))
    rng = checkpoint / f"rng-{ctx.rank}.pt"
    if rng.is_file():  # the same rank of the same number of ranks: its dropout draws go on as they would have
        _set_rng_state(torch.load(rng, weights_only=True))
    return state


SHARDS = "shards"


def _STATE_OPTIONS():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # the LoRA weights only (the base is read from the model directory), so loading leaves the frozen ones alone
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _sharded_state(sharded, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    lora, optim = get_state_dict(sharded, optimizer, options=_STATE_OPTIONS())
    return {"lora": lora, "optim": optim}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np.random.set_state(tuple(np.asarray(x, dtype=np.uint32) if i == 1 else x
                              for i, x in enumerate(state["numpy"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _names(paths: list[Path]) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
