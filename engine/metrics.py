"""Run records: metrics.jsonl, model FLOPs and MFU, the loss plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .lora import LoraLinear


class MetricsLog:
    """One JSON object per line, strict JSON (a non-finite number is written as null); flushed on every
    write so a crash loses nothing. keep_lines > 0 continues an existing file after its first keep_lines
    lines (a resumed run: what the killed run wrote after its checkpoint is dropped, not listed twice).
    Every record also goes to the `trackers` (tracking.py: train.report_to)."""

    def __init__(self, path: str | Path, keep_lines: int = 0, trackers: list = ()):
        self.path = Path(path)
        kept = []
        if keep_lines > 0 and self.path.is_file():
            kept = self.path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep_lines]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)  # a crash here leaves the old file or the cut one, never an empty one
        self.fh = open(self.path, "a", encoding="utf-8")
        self.lines = len(kept)
        self.trackers = list(trackers)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.fh.write(json.dumps(clean, allow_nan=False) + "\n")
        self.fh.flush()
        self.lines += 1
        if self.trackers and "step" in record:
            from .tracking import numeric_values

            for tracker in self.trackers:
                tracker.log(numeric_values(record), record["step"])

    def close(self) -> None:
        """Close the file and end the trackers' runs."""
        self.fh.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def matmul_parameters(model) -> int:
    """Weights that multiply every token: each nn.Linear's (LoRA's frozen base included; lm_head too)."""
    from .quantize import NF4Linear

    # from the shapes: a sharded (fsdp) model's projections hold no weight between calls
    kinds = (torch.nn.Linear, LoraLinear, NF4Linear)
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, kinds))


def training_flops(n_matmul: int, n_lora: int, tokens: int, attention_flops: float = 0.0) -> float:
    """Model FLOPs of training on `tokens` tokens (DESIGN.md): 4 N_frozen + 6 N_lora per token for the
    matmuls (no weight gradients for the frozen base; recomputation not counted), plus attention."""
    return (4 * n_matmul + 6 * n_lora) * tokens + attention_flops


def causal_attention_flops(doc_lengths, num_heads: int, head_dim: int, num_layers: int,
                           window: int | None = None) -> float:
    """Causal attention over each document of length L: forward 2 L^2 D per query head and layer
    (scores and the weighted sum, each over half of the full L x L), backward twice that. A sliding
    window of W keys leaves W^2 / 2 + (L - W) W of the L^2 / 2 query-key pairs."""
    pairs = sum(n * n / 2 if not window or n <= window else window * window / 2 + (n - window) * window
                for n in doc_lengths)
    return 12 * num_heads * head_dim * num_layers * pairs


def model_training_flops(model, n_lora: int, doc_lengths) -> float:
    """training_flops of `model` (a HF causal LM) over documents of these lengths."""
    from .model import layer_window

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention = sum(causal_attention_flops(doc_lengths, c.num_attention_heads, head_dim, 1, layer_window(c, i))
                    for i in range(c.num_hidden_layers))
    return training_flops(matmul_parameters(model), n_lora, sum(doc_lengths), attention)


_PEAK_CACHE: dict = {}


def peak_matmul_flops(device: torch.device, n: int = 8192) -> float:
    """The GPU's measured bf16 matmul rate (FLOP/s): the MFU denominator (DESIGN.md)."""
    key = str(device)
    if key not in _PEAK_CACHE:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 10
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
        _PEAK_CACHE[key] = 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)
        del a, b
    return _PEAK_CACHE[key]


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "LoRA fine-tuning") -> Path | None:
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and "stopped" not in r]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
