"""The pieces every table of bench/report.py is made of: numbers and ratios as cells, markdown tables, a
row's label, rows grouped by model."""

from __future__ import annotations

import math


def num(value, spec: str = ",.0f", none: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "–"
    return f"{a / b:.2f}×"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines


def label(row: dict) -> str:
    return row.get("case") or row.get("system", "?")


def by_model(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row.get("model", "?"), []).append(row)
    return out
