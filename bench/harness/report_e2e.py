"""The end-to-end tables of the report: tokens/s, memory, MFU and losses against stock measured in the same
run; the max-context table; and issue 7's goals, met or not, as measured."""

from __future__ import annotations

from report_cells import by_model, label, num, ratio, table

GOALS = {"speed": 3.0, "memory": 0.40, "mfu": 0.50, "context": 8.0}  # issue 7, Llama-3.1-8B at 16k tokens/step
GOAL_MODEL = "llama-3.1-8b"


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


def e2e_table(results: dict) -> list[str]:
    rows = results.get("e2e") or []
    if not rows:
        return ["No end-to-end results."]
    lines = []
    for model, group in by_model(rows).items():
        stock = next((r for r in group if r.get("case", r.get("system")) == "stock"), None)
        tps = (group[0].get("tokens_per_step") or results.get("tokens_per_step"))
        lines.append(f"**{model}**, {num(tps)} tokens per step (same documents for every system; useful tokens "
                     "exclude padding; step time is the median of the timed steps):")
        lines.append("")
        body = []
        for row in group:
            ok, stock_ok = _ok(row), _ok(stock)
            losses = row.get("step_losses") or []
            body.append([
                label(row),
                num(row.get("tokens_per_s")) if ok else _status(row),
                ratio(row.get("tokens_per_s"), stock.get("tokens_per_s")) if ok and stock_ok else "–",
                num(row.get("step_time_s"), ".3f") if ok else "–",
                num(row.get("peak_mem_gb"), ".1f") if ok else "–",
                ratio(row.get("peak_mem_gb"), stock.get("peak_mem_gb")) if ok and stock_ok else "–",
                num(100 * row["mfu"], ".1f") + "%" if ok and row.get("mfu") is not None else "–",
                num(losses[0], ".4f") if losses else "–",
                _loss_delta(row, stock),
            ])
        lines += table(["system", "tokens/s", "vs stock", "step s", "peak GiB", "mem vs stock", "MFU",
                        "loss step 1", "max rel. Δloss vs stock"], body)
        lines.append("")
    return lines


def max_context_table(results: dict) -> list[str]:
    rows = results.get("max_context") or []
    if not rows:
        return ["No max-context results."]
    body = []
    for model, group in by_model(rows).items():
        stock = next((r for r in group if label(r) == "stock"), None)
        for row in group:
            bound = "≥ " if row.get("limited_by") in ("time", "limit") else ""
            largest = row.get("largest_tokens")
            vs_stock = "–"
            if stock and stock.get("largest_tokens") and largest is not None and row is not stock:
                stock_bound = "≤ " if stock.get("limited_by") in ("time", "limit") and not bound else ""
                vs_stock = f"{bound or stock_bound}{largest / stock['largest_tokens']:.1f}×"
            body.append([model, label(row), f"{bound}{num(largest)}", num(row.get("first_failure")),
                         row.get("limited_by", "?"), vs_stock])
    return table(["model", "system", "largest document (tokens)", "first failure", "limited by", "vs stock"], body)


def goals_table(results: dict) -> list[str]:
    """Issue 7's goals on Llama-3.1-8B at 16k tokens/step, per lorafuse case: met or not, as measured."""
    rows = [r for r in results.get("e2e") or [] if r.get("model") == GOAL_MODEL]
    stock = next((r for r in rows if label(r) == "stock"), None)
    if not rows or not _ok(stock):
        return []
    contexts = {label(r): r for r in results.get("max_context") or [] if r.get("model") == GOAL_MODEL}
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
        context = contexts.get(label(row)) or {}
        ctx = context.get("largest_tokens")
        ctx_ratio = ctx / stock_ctx if ctx and stock_ctx else None
        lower_bound = context.get("limited_by") in ("time", "limit") or str(context.get("limited_by", "")).startswith(
            "stopped")
        body.append([label(row), f"{speed:.2f}× {mark(speed >= GOALS['speed'])}",
                     f"{memory:.0%} {mark(memory <= GOALS['memory'])}" if memory is not None else "–",
                     f"{mfu:.1%} {mark(mfu >= GOALS['mfu'])}" if mfu is not None else "–",
                     _context_cell(ctx_ratio, lower_bound)])
    if not body:
        return []
    return ["Goals (issue 7, Llama-3.1-8B at 16k tokens/step): ≥ 3× stock's tokens/s, ≤ 40% of its peak memory, "
            "MFU ≥ 50%, max context ≥ 8× stock's.", ""] + table(
        ["lorafuse case", "tokens/s vs stock", "peak memory vs stock", "MFU", "max context vs stock"], body)


def e2e_with_goals(results: dict) -> list[str]:
    """The end-to-end tables, then the goals table where there is one."""
    goals = goals_table(results)
    return e2e_table(results) + (goals + [""] if goals else [])


def _context_cell(vs_stock: float | None, lower_bound: bool) -> str:
    if not vs_stock:
        return "–"
    if vs_stock >= GOALS["context"]:
        return f"{'≥ ' if lower_bound else ''}{vs_stock:.1f}× ✅"
    if lower_bound:  # the search stopped before memory ran out: not decided
        return f"≥ {vs_stock:.1f}× (search stopped by time, undecided)"
    return f"{vs_stock:.1f}× ❌"
