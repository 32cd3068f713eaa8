"""The static report's markdown (every variant) and the README's summary of it (between `<!-- static:start -->`
and `<!-- static:end -->`), from bench/results/static-<date>.json (python -m lorafuse.kernels.aot --report).

    python bench/harness/report_static.py bench/results/static-2026-12-02.json --readme README.md

Running it again on the same file changes nothing. A results file may name a `baseline` (the same report
before a change): the summary then shows both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

START, END = "<!-- static:start -->", "<!-- static:end -->"


def role(variant: dict) -> str:
    """A short name for what a variant computes, from its kernel and flags."""
    kernel, label = variant["kernel"], variant["label"]
    flags = dict(re.findall(r"(\w+)=([\w.]+)", label))
    if kernel == "_lowrank_mm_kernel":
        if flags.get("GLU_BWD") == "True":
            return f"LoRA GEMM dH + {'SwiGLU' if flags.get('ACTIVATION') == 'silu' else 'GeGLU'} backward"
        if flags.get("MAP_OUTPUT") == "True":
            return "LoRA skinny dB of a group (dY^T U), rank map"
        if flags.get("HAS_LOWRANK") != "True":
            return "LoRA skinny x A^T / dY B" + (", rank map" if flags.get("MAP_SEGMENTS") == "True" else "")
        segs = flags.get("NUM_SEGS", "1")
        return f"LoRA GEMM ({segs} segment{'s' if segs != '1' else ''}" + \
            (", rank map)" if flags.get("MAP_LOWRANK") == "True" else ")")
    if kernel in ("_fwd_kernel", "_bwd_kernel"):  # the cuBLAS LoRA path's producers of [x | U] (lora_cublas.py)
        producer = "GLU + U" if "BLOCK_I" in flags else "RMSNorm + U" if "BLOCK_K" in flags else None
        if producer:
            return f"{producer} (cuBLAS path) {'forward' if kernel == '_fwd_kernel' else 'backward'}"
    names = {"_varlen_fwd_kernel": "attention forward", "_varlen_bwd_dkdv_kernel": "attention dK/dV",
             "_varlen_bwd_dq_kernel": "attention dQ", "_varlen_bwd_preprocess_kernel": "attention delta"}
    name = names.get(kernel, kernel.strip("_").removesuffix("_kernel"))
    if kernel.startswith("_varlen") and "HEAD_DIM" in flags:
        name += f" d={flags['HEAD_DIM']}"
    return name


def _measured(results: dict) -> list[dict]:
    return [v for v in results["variants"] if "registers" in v]


def summary_rows(results: dict) -> dict:
    """(role, arch) -> configs, spilling configs, max registers, max spill bytes, max shared, tensor-core shapes."""
    rows: dict = {}
    for v in _measured(results):
        row = rows.setdefault((role(v), v["arch"]), {"configs": 0, "spilling": 0, "registers": 0, "spill": 0,
                                                     "shared": 0, "min_ctas": 99, "mma": set()})
        row["configs"] += 1
        row["spilling"] += v["spill_bytes"] > 0
        row["registers"] = max(row["registers"], v["registers"])
        row["spill"] = max(row["spill"], v["spill_bytes"])
        row["shared"] = max(row["shared"], v["shared"])
        row["min_ctas"] = min(row["min_ctas"], v["ctas_per_sm"])
        row["mma"] |= set(v["mma"])
    return rows


def _shapes(mma) -> str:
    return ", ".join(sorted(s.split(" ", 1)[1] if " " in s else s for s in mma)) or "-"


def summary_table(results: dict, baseline: dict | None = None) -> list[str]:
    rows = summary_rows(results)
    before = summary_rows(baseline) if baseline else {}
    head = "| kernel | arch | configs | spilling | max regs | max spill B | max shared KB | tensor-core shapes |"
    if before:
        head += " before: spilling, max spill B, shapes |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (name, arch), r in sorted(rows.items()):
        line = (f"| {name} | sm_{arch} | {r['configs']} | {r['spilling']} | {r['registers']} | {r['spill']} | "
                f"{r['shared'] / 1024:.0f} | {_shapes(r['mma'])} |")
        if before:
            b = before.get((name, arch))
            line += f" {b['spilling']}/{b['configs']}, {b['spill']}, {_shapes(b['mma'])} |" if b else " - |"
        lines.append(line)
    return lines


def variant_table(results: dict) -> list[str]:
    lines = ["| case | arch | variant | warps/stages | regs | spill B (st+ld) | shared B | CTAs/SM | tensor-core "
             "instructions |", "|---|---|---|---|---|---|---|---|---|"]
    for v in sorted(results["variants"], key=lambda v: (v["case"], v["arch"], v["label"])):
        ws = f"{v['config']['warps']}/{v['config']['stages']}"
        if "registers" not in v:
            lines.append(f"| {v['case']} | sm_{v['arch']} | `{v['label']}` | {ws} | - | - | - | - | "
                         f"{v.get('error') or 'refused: ' + v.get('refused', '')} |")
            continue
        mma = ", ".join(f"{k} x{n}" for k, n in sorted(v["mma"].items())) or "-"
        lines.append(f"| {v['case']} | sm_{v['arch']} | `{v['label']}` | {ws} | {v['registers']} | "
                     f"{v['spill_bytes']} ({v['spill_stores']}+{v['spill_loads']}) | {v['shared']} | "
                     f"{v['ctas_per_sm']} | {mma} ({v['mma_from']}) |")
    return lines


def _totals(results: dict) -> str:
    measured = _measured(results)
    spilling = sum(v["spill_bytes"] > 0 for v in measured)
    over = sum(v["shared"] > results["shared_limit"][str(v["arch"])] for v in measured)
    return (f"{len(measured)} variants compiled, {spilling} spill, {over} over the shared-memory limit, "
            f"{sum('error' in v for v in results['variants'])} failed to compile")


def markdown(results: dict, baseline: dict | None) -> str:
    env = results.get("environment", {})
    lines = [f"# Static report {results['date']}", "",
             f"{results['headline']}. Every config of every autotune list, compiled as a launch at that shape "
             f"compiles (triton {env.get('triton', '?')}, {env.get('ptxas', 'ptxas')}), for sm_80 and sm_90. "
             f"`{results['command']}`.", "", _totals(results), ""]
    if baseline:
        lines += [f"Before ({results.get('baseline')}): {_totals(baseline)}.", ""]
    lines += ["## Summary", ""] + summary_table(results, baseline) + ["", "## Every variant", ""]
    lines += variant_table(results)
    return "\n".join(lines) + "\n"


def readme_section(results: dict, json_path: Path, readme: Path, baseline: dict | None) -> str:
    rel = Path(os.path.relpath(json_path.resolve(), readme.resolve().parent)).as_posix()
    md = rel.removesuffix(".json") + ".md"
    lines = [f"From [`{rel}`]({rel}) (every variant in [`{md}`]({md})): {_totals(results)}"
             + (f"; before this report's fixes ([`{results['baseline']}`](bench/results/{results['baseline']})): "
                f"{_totals(baseline)}." if baseline else "."), "", *summary_table(results, baseline), "",
             f"Regenerate: `{results['command']}` (no GPU needed; `python bench/harness/report_static.py "
             f"{rel} --readme README.md` redoes the tables)."]
    return "\n".join(lines) + "\n"


def _baseline(results: dict, json_path: Path) -> dict | None:
    name = results.get("baseline")
    path = json_path.parent / name if name else None
    return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else None


def write_static_report(json_path: str | Path, readme: str | Path | None = None) -> list[str]:
    json_path = Path(json_path)
    results = json.loads(json_path.read_text(encoding="utf-8"))
    baseline = _baseline(results, json_path)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(results, baseline), encoding="utf-8")
    done = [f"{md_path}"]
    if readme:
        readme = Path(readme)
        text = readme.read_text(encoding="utf-8")
        start, end = text.find(START), text.find(END)
        if start < 0 or end < start:
            raise SystemExit(f"{readme}: markers {START} and {END} not found")
        new = text[:start + len(START)] + "\n" + readme_section(results, json_path, readme, baseline) + text[end:]
        if new != text:
            readme.write_text(new, encoding="utf-8")
        done.append(f"{readme}: {'updated' if new != text else 'unchanged'}")
    return done


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a static-<date>.json file")
    parser.add_argument("--readme", default=None)
    args = parser.parse_args(argv)
    for line in write_static_report(args.results, args.readme):
        print(f"[static] {line}")


if __name__ == "__main__":
    sys.exit(main())
