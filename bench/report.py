"""Markdown tables and PNG plots from a benchmark results file (bench/run.py writes it).

    python bench/report.py bench/results/h100-80gb-hbm3-2025-01-31.json
    python bench/report.py bench/results --readme README.md     # the newest results file in the folder

Writes, next to the results file: <name>.md (end-to-end table with ratios to stock measured in the same
run, max context, kernels grouped by op with their time relative to lorafuse's, GPU tests, environment
and the exact command), <name>-e2e.png (useful tokens/s and peak memory per system) and
<name>-kernels.png (kernel time per system, one panel per op). With --readme, the text between
`<!-- bench:start -->` and `<!-- bench:end -->` in that README is replaced by the newest table, the plot
links and the command to reproduce; running it again with the same results changes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
GOALS = {"speed": 3.0, "memory": 0.40, "mfu": 0.50, "context": 8.0}  # issue 7, Llama-3.1-8B at 16k tokens/step
GOAL_MODEL = "llama-3.1-8b"


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _num(value, spec: str = ",.0f", none: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def _ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "–"
    return f"{a / b:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines


def _label(row: dict) -> str:
    return row.get("case") or row.get("system", "?")


def _status(row: dict) -> str:
    if row.get("oom"):
        step = row.get("oom_at_step")
        return "OOM" + (f" (step {step})" if step else "")
    if row.get("error"):
        return "error: " + str(row["error"])[:80]
    return "ok"


def _ok(row: dict | None) -> bool:
    return bool(row) and not row.get("oom") and not row.get("error") and row.get("tokens_per_s") is not None


def _loss_delta(row: dict, stock: dict | None) -> str:
    if not stock or not row.get("step_losses") or not stock.get("step_losses") or row is stock:
        return "–"
    pairs = list(zip(row["step_losses"], stock["step_losses"]))
    return f"{max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs):.1e}"


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _by_model(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row.get("model", "?"), []).append(row)
    return out


def e2e_table(results: dict) -> list[str]:
    rows = results.get("e2e") or []
    if not rows:
        return ["No end-to-end results."]
    lines = []
    for model, group in _by_model(rows).items():
        stock = next((r for r in group if r.get("case", r.get("system")) == "stock"), None)
        tps = (group[0].get("tokens_per_step") or results.get("tokens_per_step"))
        lines.append(f"**{model}**, {_num(tps)} tokens per step (same documents for every system; useful tokens "
                     "exclude padding; step time is the median of the timed steps):")
        lines.append("")
        body = []
        for row in group:
            ok, stock_ok = _ok(row), _ok(stock)
            losses = row.get("step_losses") or []
            body.append([
                _label(row),
                _num(row.get("tokens_per_s")) if ok else _status(row),
                _ratio(row.get("tokens_per_s"), stock.get("tokens_per_s")) if ok and stock_ok else "–",
                _num(row.get("step_time_s"), ".3f") if ok else "–",
                _num(row.get("peak_mem_gb"), ".1f") if ok else "–",
                _ratio(row.get("peak_mem_gb"), stock.get("peak_mem_gb")) if ok and stock_ok else "–",
                _num(100 * row["mfu"], ".1f") + "%" if ok and row.get("mfu") is not None else "–",
                _num(losses[0], ".4f") if losses else "–",
                _loss_delta(row, stock),
            ])
        lines += _table(["system", "tokens/s", "vs stock", "step s", "peak GiB", "mem vs stock", "MFU",
                         "loss step 1", "max rel. Δloss vs stock"], body)
        lines.append("")
    return lines


def max_context_table(results: dict) -> list[str]:
    rows = results.get("max_context") or []
    if not rows:
        return ["No max-context results."]
    body = []
    for model, group in _by_model(rows).items():
        stock = next((r for r in group if _label(r) == "stock"), None)
        for row in group:
            bound = "≥ " if row.get("limited_by") in ("time", "limit") else ""
            largest = row.get("largest_tokens")
            ratio = "–"
            if stock and stock.get("largest_tokens") and largest is not None and row is not stock:
                stock_bound = "≤ " if stock.get("limited_by") in ("time", "limit") and not bound else ""
                ratio = f"{bound or stock_bound}{largest / stock['largest_tokens']:.1f}×"
            body.append([model, _label(row), f"{bound}{_num(largest)}", _num(row.get("first_failure")),
                         row.get("limited_by", "?"), ratio])
    return _table(["model", "system", "largest document (tokens)", "first failure", "limited by", "vs stock"], body)


def goals_table(results: dict) -> list[str]:
    """Issue 7's goals on Llama-3.1-8B at 16k tokens/step, per lorafuse case: met or not, as measured."""
    rows = [r for r in results.get("e2e") or [] if r.get("model") == GOAL_MODEL]
    stock = next((r for r in rows if _label(r) == "stock"), None)
    if not rows or not _ok(stock):
        return []
    contexts = {_label(r): r for r in results.get("max_context") or [] if r.get("model") == GOAL_MODEL}
    stock_ctx = (contexts.get("stock") or {}).get("largest_tokens")
    mark = lambda ok: "✅" if ok else "❌"
    body = []
    for row in rows:
        if row.get("system") != "lorafuse" or not _ok(row):
            continue
        speed = row["tokens_per_s"] / stock["tokens_per_s"]
        memory = row["peak_mem_gb"] / stock["peak_mem_gb"] if row.get("peak_mem_gb") and stock.get("peak_mem_gb") \
            else None
        mfu = row.get("mfu")
        context = contexts.get(_label(row)) or {}
        ctx = context.get("largest_tokens")
        ctx_ratio = ctx / stock_ctx if ctx and stock_ctx else None
        lower_bound = context.get("limited_by") in ("time", "limit") or str(context.get("limited_by", "")).startswith(
            "stopped")
        body.append([_label(row), f"{speed:.2f}× {mark(speed >= GOALS['speed'])}",
                     f"{memory:.0%} {mark(memory <= GOALS['memory'])}" if memory is not None else "–",
                     f"{mfu:.1%} {mark(mfu >= GOALS['mfu'])}" if mfu is not None else "–",
                     _context_cell(ctx_ratio, lower_bound)])
    if not body:
        return []
    return ["Goals (issue 7, Llama-3.1-8B at 16k tokens/step): ≥ 3× stock's tokens/s, ≤ 40% of its peak memory, "
            "MFU ≥ 50%, max context ≥ 8× stock's.", ""] + _table(
        ["lorafuse case", "tokens/s vs stock", "peak memory vs stock", "MFU", "max context vs stock"], body)


def _context_cell(ratio: float | None, lower_bound: bool) -> str:
    if not ratio:
        return "–"
    if ratio >= GOALS["context"]:
        return f"{'≥ ' if lower_bound else ''}{ratio:.1f}× ✅"
    if lower_bound:  # the search stopped before memory ran out: not decided
        return f"≥ {ratio:.1f}× (search stopped by time, undecided)"
    return f"{ratio:.1f}× ❌"


def _group_key(row: dict) -> tuple:
    info = row.get("info") or {}
    return (row.get("op"), row.get("shape"), str(info.get("tokens", "")), str(info.get("head", "")),
            str(info.get("dtype", "")))


def reference_system(rows: list[dict]) -> str:
    """What the peers of an op are compared with: "lorafuse", else its first lorafuse variant."""
    systems = sorted({r.get("system", "") for r in rows})
    if "lorafuse" in systems:
        return "lorafuse"
    return next((s for s in systems if s.startswith("lorafuse")), "lorafuse")


def kernels_by_op(results: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in results.get("kernels") or []:
        out.setdefault(row.get("op", "?"), []).append(row)
    return out


def kernels_table(results: dict) -> list[str]:
    ops = kernels_by_op(results)
    if not ops:
        return ["No kernel results."]
    lines = []
    for op, rows in ops.items():
        ours = reference_system(rows)
        reference = {}
        for row in rows:
            if row.get("system") == ours and row.get("median_ms"):
                reference[_group_key(row)] = row["median_ms"]
        body = []
        for row in sorted(rows, key=lambda r: (_group_key(r)[1:], r.get("system") != ours, r.get("system"))):
            info = row.get("info") or {}
            shape = row.get("shape", "")
            extra = ", ".join(f"{k} {info[k]}" for k in ("tokens", "head") if k in info and str(info[k]) not in shape)
            ms = row.get("median_ms")
            ref = reference.get(_group_key(row))
            body.append([shape + (f" ({extra})" if extra else ""), row.get("system", "?"), _num(ms, ".3f"),
                         _num(row.get("tflops"), ".1f"), _num(row.get("gb_per_s"), ",.0f"),
                         _num(row.get("peak_mem_gb"), ".2f"), _ratio(ms, ref) if ref and ms else "–"])
        lines += [f"**{op}**", ""]
        lines += _table(["shape", "system", "median ms", "TFLOP/s", "GB/s", "peak GiB", f"time vs {ours}"], body)
        lines.append("")
    return lines


def tests_lines(results: dict) -> list[str]:
    tests = results.get("tests")
    if not tests:
        return ["GPU tests were not run."]
    line = (f"`{tests.get('command', 'pytest -m gpu tests')}`: {tests.get('passed', 0)} passed, "
            f"{tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped "
            f"({tests.get('status', '?')}, {_num(tests.get('seconds'), '.0f')} s)")
    out = [line]
    if tests.get("failed_ids"):
        out += ["", "Failed: " + ", ".join(f"`{t}`" for t in tests["failed_ids"][:20])]
    return out


def commands(results: dict) -> list[str]:
    """Every run.py call that wrote this file (several with --merge), oldest first."""
    return [c["command"] for c in results.get("calls") or []] or [results.get("command", "python bench/run.py")]


def environment_lines(results: dict) -> list[str]:
    bw = results.get("copy_bandwidth_gbs") or {}
    bw_text = ", ".join(f"{k} {v:.0f} GB/s" for k, v in bw.items()) if isinstance(bw, dict) else _num(bw, ".0f")
    git = results.get("git") or {}
    items = [("GPU", results.get("gpu") or "none"), ("peak bf16 matmul (measured)",
                                                     _num(results.get("peak_bf16_tflops"), ".0f") + " TFLOP/s"),
             ("copy bandwidth (measured)", bw_text or "–"), ("torch", results.get("torch")),
             ("CUDA", results.get("cuda")), ("triton", results.get("triton")),
             ("transformers", results.get("transformers")), ("peft", results.get("peft")),
             ("liger-kernel", results.get("liger_kernel") or "not installed"),
             ("offload extension", results.get("offload_extension")),
             ("date", results.get("started_at") or results.get("date")),
             ("commit", (git.get("commit") or "?")[:12] + (" (dirty)" if git.get("dirty") else "")),
             ("duration", _num(results.get("duration_s"), ".0f") + " s")]
    lines = [f"- {k}: {v}" for k, v in items if v is not None]
    lines += [""] + [f"Command: `{c}`" for c in commands(results)]
    stages = results.get("stages") or {}
    if stages:
        lines += ["", "Stages: " + "; ".join(f"{name} {s.get('status', '?')} ({_num(s.get('seconds'), '.0f')} s)"
                                              for name, s in stages.items())]
    return lines


def markdown(results: dict, name: str) -> str:
    gpu = results.get("gpu") or "no GPU"
    lines = [f"# lorafuse benchmark: {gpu}, {results.get('date', '?')}", "",
             "## End to end: LoRA r=16 on all seven projections, stock HF + PEFT vs lorafuse", ""]
    lines += e2e_table(results)
    goals = goals_table(results)
    if goals:
        lines += goals + [""]
    lines += [f"![end to end]({name}-e2e.png)", "", "## Max context (largest single document that trains)", ""]
    lines += max_context_table(results)
    lines += ["", "## Kernels (forward + backward; time relative to lorafuse in the same run)", ""]
    lines += kernels_table(results)
    if kernels_with_time(results):
        lines += [f"![kernels]({name}-kernels.png)", ""]
    lines += ["## GPU tests", ""] + tests_lines(results) + ["", "## Environment", ""] + environment_lines(results)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_e2e(results: dict, path: Path) -> Path | None:
    groups = _by_model(results.get("e2e") or [])
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.6 * len(groups)), squeeze=False)
    for (model, rows), (ax_speed, ax_mem) in zip(groups.items(), axes):
        labels = [_label(r) for r in rows]
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


def kernels_with_time(results: dict) -> dict[str, list[dict]]:
    return {op: [r for r in rows if r.get("median_ms")] for op, rows in kernels_by_op(results).items()
            if any(r.get("median_ms") for r in rows)}


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


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------


def readme_section(results: dict, json_path: Path, readme: Path) -> str:
    """What goes between the README's markers: the newest end-to-end table, plot links, the command."""
    base = readme.resolve().parent

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), base)).as_posix()

    stem = json_path.with_suffix("")
    lines = [f"Newest results: {results.get('gpu') or 'no GPU'}, {results.get('date', '?')} "
             f"([`{rel(json_path)}`]({rel(json_path)}), details in [`{rel(stem.with_suffix('.md'))}`]"
             f"({rel(stem.with_suffix('.md'))})).", ""]
    lines += e2e_table(results)
    goals = goals_table(results)
    if goals:
        lines += goals + [""]
    if results.get("max_context"):
        lines += ["Max context (largest single document that trains):", ""] + max_context_table(results) + [""]
    e2e_png = Path(f"{stem}-e2e.png")
    kernels_png = Path(f"{stem}-kernels.png")
    if e2e_png.is_file():
        lines += [f"![end to end]({rel(e2e_png)})", ""]
    if kernels_png.is_file():
        lines += [f"![kernels]({rel(kernels_png)})", ""]
    lines += ["Reproduce on one GPU (about 10 minutes; writes `bench/results/<gpu>-<date>.json`, the tables and "
              "the plots):", "", "```", *commands(results),
              "```"]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, section: str) -> bool:
    """Replace the text between the markers; True if the file changed."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise SystemExit(f"{readme}: markers {START} and {END} not found (in that order); add them where the "
                         "results should go")
    new = text[:start + len(START)] + "\n" + section + text[end:]
    if new == text:
        return False
    readme.write_text(new, encoding="utf-8")
    return True


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def newest_results(folder: Path) -> Path:
    """The newest results file in a folder: by its recorded start time, then by name."""
    found = []
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "e2e" in data:
            found.append((str(data.get("started_at") or data.get("date") or ""), path.name, path))
    if not found:
        raise SystemExit(f"{folder}: no results JSON files")
    return max(found)[2]


def write_report(json_path: str | Path, readme: str | Path | None = None) -> dict:
    json_path = Path(json_path)
    if json_path.is_dir():
        json_path = newest_results(json_path)
    results = json.loads(json_path.read_text())
    stem = json_path.with_suffix("")
    md_path = stem.with_suffix(".md")
    written = {"json": json_path, "md": md_path}
    written["e2e_png"] = plot_e2e(results, Path(f"{stem}-e2e.png"))
    written["kernels_png"] = plot_kernels(results, Path(f"{stem}-kernels.png"))
    md_path.write_text(markdown(results, stem.name), encoding="utf-8")
    if readme:
        written["readme_changed"] = update_readme(Path(readme), readme_section(results, json_path, Path(readme)))
    return written


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("results", help="a results JSON file, or a folder (its newest results file)")
    parser.add_argument("--readme", default=None, help="refresh the section between the bench markers")
    args = parser.parse_args(argv)
    written = write_report(args.results, args.readme)
    for key, value in written.items():
        if value is not None and key != "readme_changed":
            print(f"[report] {key}: {value}")
    if args.readme:
        print(f"[report] {args.readme}: {'updated' if written['readme_changed'] else 'unchanged'}")
    return written


if __name__ == "__main__":
    main()
