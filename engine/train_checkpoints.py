"""Training checkpoints: OUTPUT_DIR/checkpoint-STEP, to resume a run from (`lorafuse train --resume`).

A checkpoint holds the adapter (PEFT format), the optimizer state and the step. Not to be
confused with activation checkpointing (what backward recomputes), which is engine/activations/.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .config import Config
from .lora import load_adapter_weights, save_adapter

CHECKPOINTS_KEPT = 2
OPTIMIZER_STATE = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"


def save_checkpoint(model, cfg: Config, optimizer, step: int, out: Path) -> Path:
    """OUTPUT_DIR/checkpoint-STEP with the adapter, optimizer state and step; written under a
    temporary name and renamed, so a crash never leaves a broken checkpoint. Keeps the newest few."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, cfg.lora, tmp, cfg.model)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_STATE)
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(model, optimizer, checkpoint: Path, device: torch.device) -> int:
    """Restore the adapter and optimizer state of a checkpoint; returns its step."""
    load_adapter_weights(model, checkpoint)
    optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_STATE, map_location=device, weights_only=True))
    return json.loads((checkpoint / TRAINER_STATE).read_text())["step"]


def _checkpoints(out: Path) -> list[Path]:
    """checkpoint-STEP directories, oldest first."""
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
