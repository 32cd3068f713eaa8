"""The run manifest: what OUTPUT_DIR/run.json says about a run besides the identity that resuming checks,
enough to reproduce it and to compare it with another.

  config        every key, defaults included (as config.yaml)
  data_files    path, size and sha256 (the identity's: its first 16 hex digits) of each data file, mixed-in
                files included
  model         the directory, its config.json (whole) and sha256, and per file: sha256 of the small files
                (config, tokenizer, chat template), size and modification time of the weight files. Weights
                are not hashed: reading tens of GB would hold up every start for minutes, on a GPU paid by
                the hour; a replaced or rewritten file changes its size or its mtime
  versions      lorafuse, torch, triton, transformers, Python
  git           the commit (and whether the tree had changes) when lorafuse runs from a checkout
  device        the device, its name (the GPU's), how many processes ran, CUDA version
  final         at the end: how it ended, steps, losses, tokens, wall time (train_checkpoints.finish_run_file)
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from .config import Config

HASHED_UP_TO = 64 * 2**20  # files of a model directory up to this size are hashed; larger: size and mtime
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_manifest(cfg: Config, identity: dict, device: torch.device, world: int) -> dict:
    hashes = identity.get("data_files", {})
    files = {split: getattr(cfg.data, split) for split in ("train", "validation", "test") if getattr(cfg.data, split)}
    files.update({f"mix[{i}]": m.path for i, m in enumerate(cfg.data.mix)})
    return {"started_at": _now(), "config": dataclasses.asdict(cfg),
            "data_files": {k: {"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size, "sha256": hashes.get(k)}
                           for k, p in files.items()},
            "model": model_fingerprint(cfg.model), "versions": versions(), "git": git_state(),
            "device": device_info(device, world)}


def model_fingerprint(path: str | Path) -> dict:
    root = Path(path).resolve()
    config_file = root / "config.json"
    out = {"path": str(root), "config": _json_or_none(config_file), "files": {},
           "weights": "size and mtime, not hashed (hashing GBs of weights would hold up every start for minutes)"}
    for f in sorted(p for p in root.iterdir() if p.is_file()):
        st = f.stat()
        entry = {"bytes": st.st_size}
        if f.suffix in WEIGHT_SUFFIXES or st.st_size > HASHED_UP_TO:
            entry["mtime"] = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).isoformat()
        else:
            entry["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
        out["files"][f.name] = entry
    return out


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("lorafuse", "triton", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict | None:
    """The commit lorafuse runs from, and whether tracked files differ from it; None outside a checkout."""
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def device_info(device: torch.device, world: int) -> dict:
    out = {"device": str(device), "processes": world, "cuda": torch.version.cuda,
           "cpu_threads": torch.get_num_threads(), "host": platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    else:
        out["name"] = platform.processor() or platform.machine()
    out["visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return out


def final_metrics(result, status: str, seconds: float, steps: int, tokens: int) -> dict:
    """How the run ended (finished, early_stopped, stopped: why, interrupted) and what it reached; steps and
    tokens count the optimizer steps done (a resumed run: since the start of the run) and the tokens this
    process trained on (a resumed run: since it resumed)."""
    losses = result.train_losses
    return {"status": status, "finished_at": _now(), "seconds": round(seconds, 1), "steps": steps,
            "tokens": tokens, "train_loss": losses[-1] if losses else None,
            "train_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "val_loss": result.val_losses[-1][1] if result.val_losses else None,
            "best_val_loss": result.best_val_loss, "test": result.test or None}


def _json_or_none(path: Path):
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
