"""The report's markdown page, <name>.md beside the results file: every table, the plots, the GPU tests, the
environment and the exact commands that made the file."""

from __future__ import annotations

from report_cells import num
from report_e2e import e2e_with_goals, max_context_table
from report_kernels import kernels_table, kernels_with_time


def tests_lines(results: dict) -> list[str]:
    tests = results.get("tests")
    if not tests:
        return ["GPU tests were not run."]
    line = (f"`{tests.get('command', 'pytest -m gpu tests')}`: {tests.get('passed', 0)} passed, "
            f"{tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped "
            f"({tests.get('status', '?')}, {num(tests.get('seconds'), '.0f')} s)")
    out = [line]
    if tests.get("failed_ids"):
        out += ["", "Failed: " + ", ".join(f"`{t}`" for t in tests["failed_ids"][:20])]
    return out


def commands(results: dict) -> list[str]:
    """Every run.py call that wrote this file (several with --merge), oldest first."""
    return [c["command"] for c in results.get("calls") or []] or [results.get("command", "python bench/run.py")]


def environment_lines(results: dict) -> list[str]:
    bw = results.get("copy_bandwidth_gbs") or {}
    bw_text = ", ".join(f"{k} {v:.0f} GB/s" for k, v in bw.items()) if isinstance(bw, dict) else num(bw, ".0f")
    git = results.get("git") or {}
    items = [("GPU", results.get("gpu") or "none"), ("peak bf16 matmul (measured)",
                                                     num(results.get("peak_bf16_tflops"), ".0f") + " TFLOP/s"),
             ("copy bandwidth (measured)", bw_text or "–"), ("torch", results.get("torch")),
             ("CUDA", results.get("cuda")), ("triton", results.get("triton")),
             ("transformers", results.get("transformers")), ("peft", results.get("peft")),
             ("liger-kernel", results.get("liger_kernel") or "not installed"),
             ("offload extension", results.get("offload_extension")),
             ("date", results.get("started_at") or results.get("date")),
             ("commit", (git.get("commit") or "?")[:12] + (" (dirty)" if git.get("dirty") else "")),
             ("duration", num(results.get("duration_s"), ".0f") + " s")]
    lines = [f"- {k}: {v}" for k, v in items if v is not None]
    lines += [""] + [f"Command: `{c}`" for c in commands(results)]
    stages = results.get("stages") or {}
    if stages:
        lines += ["", "Stages: " + "; ".join(f"{name} {s.get('status', '?')} ({num(s.get('seconds'), '.0f')} s)"
                                              for name, s in stages.items())]
    return lines


def markdown(results: dict, name: str) -> str:
    gpu = results.get("gpu") or "no GPU"
    lines = [f"# lorafuse benchmark: {gpu}, {results.get('date', '?')}", "",
             "## End to end: LoRA r=16 on all seven projections, stock HF + PEFT vs lorafuse", ""]
    lines += e2e_with_goals(results)
    lines += [f"![end to end]({name}-e2e.png)", "", "## Max context (largest single document that trains)", ""]
    lines += max_context_table(results)
    lines += ["", "## Kernels (forward + backward; time relative to lorafuse in the same run)", ""]
    lines += kernels_table(results)
    if kernels_with_time(results):
        lines += [f"![kernels]({name}-kernels.png)", ""]
    lines += ["## GPU tests", ""] + tests_lines(results) + ["", "## Environment", ""] + environment_lines(results)
    return "\n".join(lines).rstrip() + "\n"
