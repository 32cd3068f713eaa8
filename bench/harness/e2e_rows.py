"""The end-to-end benchmark's results file: its environment header, one row per case (what identifies it,
what failed), and the one-line log of a row."""

from __future__ import annotations

import contextlib
import os
import platform
import traceback

import torch

from e2e_cases import CASES, HF_CASES
from e2e_failures import is_oom
from e2e_runner import Runner
from results_file import write_results

CONTEXT_KEYS = ("model", "system", "case", "checkpointing", "dtype", "device", "layers", "offload_backend")


def environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": str(device), "cuda": torch.version.cuda,
           "kernels": os.environ.get("LORAFUSE_KERNELS", "auto"),
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    for name in ("triton", "peft", "liger_kernel"):
        with contextlib.suppress(Exception):
            module = __import__(name)
            env[name] = getattr(module, "__version__", "?")
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return env


def save(results: dict, path: str | None) -> None:
    if path:
        write_results(results, path)


def entry(args, case: str, runner: Runner | None) -> dict:
    """What identifies a case's row: model, system, checkpointing, sizes, and what the built runner knows."""
    system, checkpointing = CASES[case]
    row = {"model": args.model, "system": system, "case": case, "checkpointing": checkpointing,
           "tokens_per_step": args.tokens_per_step, "dtype": str(args.dtype).removeprefix("torch."),
           "device": str(args.device)}
    if case in HF_CASES:
        row["stock_batch_size"] = args.stock_batch_size
    if args.layers:
        row["layers"] = args.layers
    if runner is not None:
        row.update(runner.info)
        if getattr(runner, "checkpointer", None) is not None:  # lorafuse with recompute or offload
            row["offload_backend"] = runner.checkpointer.backend
    return row


def fail_row(row: dict, error: BaseException, log=print, when: str = "") -> None:
    """A case that could not run: OOM (a result) or an error (a message), with the HF keys present."""
    row.update(step_losses=row.get("step_losses", []), tokens_per_s=None, step_time_s=None, peak_mem_gb=None,
               mfu=None, oom=bool(is_oom(error)))
    if row["oom"]:
        row.setdefault("oom_at_step", 0)
        if when:
            row["note"] = f"out of memory while {when}"
    else:
        row["error"] = f"{type(error).__name__}: {error}" + (f" (while {when})" if when else "")
        row["traceback"] = traceback.format_exception(error)[-6:]
    log(f"[e2e] {row['case']}: {'out of memory' if row['oom'] else row['error']}")


def print_row(row: dict, log=print) -> None:
    if row.get("oom"):
        log(f"[e2e] {row['case']}: OOM at step {row.get('oom_at_step')}")
        return
    if row.get("error"):
        log(f"[e2e] {row['case']}: error {row['error']}")
        return
    parts = [f"{row['tokens_per_s']:.0f} tok/s", f"step {row['step_time_s'] * 1e3:.0f} ms"]
    if row.get("peak_mem_gb") is not None:
        parts.append(f"peak {row['peak_mem_gb']:.2f} GiB")
    if row.get("mfu") is not None:
        parts.append(f"MFU {row['mfu']:.1%}")
    parts.append("losses " + ", ".join(f"{x:.4f}" for x in row["step_losses"][:3]))
    log(f"[e2e] {row['case']}: " + ", ".join(parts))
