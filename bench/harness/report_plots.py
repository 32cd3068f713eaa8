"""The report's PNG plots: useful tokens/s and peak memory per system (one row of panels per model), and
kernel time per system (one panel per op)."""

from __future__ import annotations

import math
from pathlib import Path

from report_cells import by_model, label
from report_kernels import kernels_with_time, reference_system


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_e2e(results: dict, path: Path) -> Path | None:
    groups = by_model(results.get("e2e") or [])
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.6 * len(groups)), squeeze=False)
    for (model, rows), (ax_speed, ax_mem) in zip(groups.items(), axes):
        labels = [label(r) for r in rows]
        colors = ["#888888" if r.get("system") != "lorafuse" else "#1f77b4" for r in rows]
        speed = [r.get("tokens_per_s") or 0.0 for r in rows]
        memory = [r.get("peak_mem_gb") or 0.0 for r in rows]
        for ax, values, title, fmt in ((ax_speed, speed, "useful tokens/s", "{:,.0f}"),
                                       (ax_mem, memory, "peak memory (GiB)", "{:.1f}")):
            bars = ax.bar(range(len(rows)), values, color=colors)
            ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            for bar, row, value in zip(bars, rows, values):
                text = "OOM" if row.get("oom") else ("error" if row.get("error") else fmt.format(value))
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
    fig.suptitle(f"{results.get('gpu') or 'no GPU'}, {results.get('date', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kernels(results: dict, path: Path) -> Path | None:
    ops = kernels_with_time(results)
    if not ops:
        return None
    plt = _pyplot()
    cols = min(3, len(ops))
    nrows = math.ceil(len(ops) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.8 * nrows), squeeze=False)
    for ax, (op, rows) in zip(axes.flat, ops.items()):
        shapes = list(dict.fromkeys(_shape_label(r) for r in rows))
        ours = reference_system(rows)
        systems = sorted({r.get("system", "?") for r in rows}, key=lambda s: (s != ours, s))
        width = 0.8 / max(1, len(systems))
        for i, system in enumerate(systems):
            values = [next((r["median_ms"] for r in rows if r.get("system") == system and _shape_label(r) == s), 0)
                      for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], values, width, label=system)
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(shapes))], shapes, rotation=25,
                      ha="right", fontsize=7)
        times = [r["median_ms"] for r in rows if r.get("median_ms")]
        if times and max(times) / min(times) > 30:  # shapes of very different cost: keep the small ones visible
            ax.set_yscale("log")
        ax.set_ylabel("median ms (lower is better)", fontsize=8)
        ax.set_title(op, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shape_label(row: dict) -> str:
    info = row.get("info") or {}
    shape = str(row.get("shape", ""))
    extra = [f"{k}={info[k]}" for k in ("tokens", "head") if k in info and str(info[k]) not in shape]
    return shape + (" " + " ".join(extra) if extra else "")
