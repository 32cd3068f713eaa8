"""The kernels table of the report: cases grouped by op, each system's time relative to lorafuse's in the
same run."""

from __future__ import annotations

from report_cells import num, ratio, table


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


def kernels_with_time(results: dict) -> dict[str, list[dict]]:
    return {op: [r for r in rows if r.get("median_ms")] for op, rows in kernels_by_op(results).items()
            if any(r.get("median_ms") for r in rows)}


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
            body.append([shape + (f" ({extra})" if extra else ""), row.get("system", "?"), num(ms, ".3f"),
                         num(row.get("tflops"), ".1f"), num(row.get("gb_per_s"), ",.0f"),
                         num(row.get("peak_mem_gb"), ".2f"), ratio(ms, ref) if ref and ms else "–"])
        lines += [f"**{op}**", ""]
        lines += table(["shape", "system", "median ms", "TFLOP/s", "GB/s", "peak GiB", f"time vs {ours}"], body)
        lines.append("")
    return lines
