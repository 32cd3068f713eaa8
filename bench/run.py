"""The one benchmark command: GPU tests, kernel micro-benchmarks and the end-to-end benchmark on one GPU.

    python bench/run.py                  # ~10 minutes on one H100/H200 (make bench-gpu)
    python bench/run.py --quick          # ~5 minutes: fewer steps, shorter searches
    python bench/run.py --only e2e --models llama-3.1-8b qwen2.5-7b --time-budget-s 1500
    python bench/run.py --only e2e --merge --out "$OUT/results"   # one part of a run split over calls
    python bench/run.py --only tests --stage-budget tests=420        # a stage's own budget

Stages, each in its own subprocess with its own time budget (a failure or a timeout is recorded in the
results and the next stage runs; a CUDA error in one stage cannot poison the next):

  env       GPU name, versions, the measured bf16 matmul peak (lorafuse.engine.metrics.peak_matmul_flops)
            and copy bandwidths; builds the offload extension once so no later stage pays for it
  tests     pytest -m gpu tests (TRITON_INTERPRET=0): pass / fail / skip counts and the failed ids
  kernels   pytest bench/kernels (TRITON_INTERPRET=0), one process per file; each case's extra_info
            (system, shape, median_ms, tflops or gb_per_s, peak memory) is collected as it finishes
  e2e       bench/e2e.py per model, one process per built model: stock HF + PEFT, its max-context search,
            then hf_packed (the same model without padding); lorafuse with checkpointing none / recompute /
            offload, then the max-context searches of recompute and offload
  peers     bench/e2e.py for liger (HF + PEFT + Liger-Kernel) where it is installed
  checkpointing  bench/bench_checkpointing.py at 8 layers (only with --with-checkpointing)

Writes bench/results/<gpu>-<YYYY-MM-DD>.json (rewritten after every stage, so a killed run keeps what
it measured; --quick adds -quick to the name), then bench/report.py makes the markdown table and PNG
plots next to it (--readme README.md also refreshes the README's results section). With --merge, a
results file already there keeps what the stages not run now measured, and `calls` lists every run.

This file is also a pytest plugin (`-p run`, used by the kernels stage): it appends every finished
benchmark case to $LORAFUSE_BENCH_JSONL, so a file that runs out of time keeps its finished cases.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
STAGES = ("env", "tests", "kernels", "e2e", "peers", "checkpointing")
REPORT_RESERVE_S = 15.0  # kept back at the end for writing the report
MODEL_FOR_SMALL_GPUS = "llama-3.2-1b"
SMALL_GPU_GIB = 40
EXTRA_MODELS = ["qwen2.5-7b", "mistral-7b", "llama-3.2-1b"]

# budgets in seconds: (full run, --quick)
BUDGETS = {"total": (570, 330), "env": (150, 120), "tests": (90, 60), "kernels": (120, 60),
           "checkpointing": (120, 60)}
PEER_BUDGET_S = (75, 0)  # kept back for each available peer (full run, --quick)
E2E_STEPS = {False: (2, 5), True: (1, 3)}  # (warm-up, timed) steps


# ---------------------------------------------------------------------------------------------
# pytest plugin (kernels stage): record each finished benchmark case at once
# ---------------------------------------------------------------------------------------------


def pytest_runtest_makereport(item, call):
    """After a benchmark case's call phase: one JSON line with its extra_info and pytest-benchmark's median."""
    path = os.environ.get("LORAFUSE_BENCH_JSONL")
    if not path or call.when != "call":
        return None
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is None:
        return None
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    line = {"nodeid": item.nodeid, "file": Path(str(item.fspath)).name, "name": item.name,
            "ok": call.excinfo is None, "extra_info": dict(getattr(bench, "extra_info", {}) or {}),
            "benchmark_median_s": getattr(stats, "median", None) if stats is not None else None}
    with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, default=str) + "\n")
    return None


# ---------------------------------------------------------------------------------------------
# Subprocesses with a time limit
# ---------------------------------------------------------------------------------------------


def run_logged(cmd: list[str], timeout: float, env: dict | None = None, log_path: Path | None = None,
               echo: bool = True) -> dict:
    """Run cmd (its own process group), echoing its output; kill the group after `timeout` seconds.
    Returns rc, timed_out, seconds and the output (last 400 lines)."""
    started = time.monotonic()
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1, start_new_session=True)
    lines: collections.deque = collections.deque(maxlen=400)
    log_fh = open(log_path, "w", encoding="utf-8") if log_path else None

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            if log_fh:
                log_fh.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        rc = proc.returncode
    reader.join(timeout=5)
    if log_fh:
        log_fh.close()
    return {"rc": rc, "timed_out": timed_out, "seconds": time.monotonic() - started, "output": "".join(lines)}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this script started, then SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _gpu_env() -> dict:
    """Environment of every GPU stage: compiled kernels, no interpreter."""
    env = {"TRITON_INTERPRET": "0", "PYTHONSAFEPATH": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    return env


def _tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


# ---------------------------------------------------------------------------------------------
# Stage: environment (run as a worker subprocess: the parent never touches CUDA, so its context
# takes no memory from the benchmarks)
# ---------------------------------------------------------------------------------------------


def worker_env(out: str) -> None:
    import platform

    import torch

    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                  "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "peft", "liger_kernel", "flash_attn", "pytest_benchmark"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", None) or _dist_version(name)
        except Exception:  # noqa: BLE001 - not installed, or broken: either way absent
            info[name] = None
    try:
        from transformers import masking_utils

        info["hf_packed_supported"] = hasattr(masking_utils, "find_packed_sequence_indices")
    except ImportError:
        info["hf_packed_supported"] = False
    info["gpu"] = None
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count)
        info["nvidia_smi"] = _nvidia_smi()
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        ends = time.monotonic() + 1.0
        while time.monotonic() < ends:  # bring the clocks up before the peak is measured (as bench/e2e.py)
            for _ in range(8):
                a @ a
            torch.cuda.synchronize(device)
        del a
        from lorafuse.engine.metrics import peak_matmul_flops

        info["peak_bf16_tflops"] = peak_matmul_flops(device) / 1e12
        info["copy_bandwidth_gbs"] = copy_bandwidth(device)
        torch.cuda.empty_cache()
    else:
        info.update(peak_bf16_tflops=None, copy_bandwidth_gbs=None)
    try:
        from lorafuse.engine.checkpointing import extension_status, load_extension

        load_extension()  # builds it into the cache once, outside every timed stage
        info["offload_extension"] = extension_status()
    except Exception as error:  # noqa: BLE001
        info["offload_extension"] = f"error: {type(error).__name__}: {error}"
    Path(out).write_text(json.dumps(info, indent=2, default=str))


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    for dist in (name, name.replace("_", "-")):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return None


def _nvidia_smi() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    return None


def copy_bandwidth(device, nbytes: int = 1 << 30, reps: int = 5) -> dict:
    """GB/s (1e9 bytes) of host<->device copies from pinned memory and of a device-to-device copy
    (read + write counted)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev2 = torch.empty_like(dev)

    def timed(fn) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    out = {"h2d_pinned": nbytes / timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9,
           "d2h_pinned": nbytes / timed(lambda: host.copy_(dev, non_blocking=True)) / 1e9,
           "d2d": 2 * nbytes / timed(lambda: dev2.copy_(dev)) / 1e9}
    return out  # the buffers go with this frame


def stage_env(results: dict, args, budget: float, work: Path) -> dict:
    out = work / "env.json"
    env = _gpu_env()
    res = run_logged([sys.executable, str(BENCH / "run.py"), "--worker", "env", "--worker-out", str(out)], budget,
                     env=env, log_path=work / "env.log", echo=args.verbose)
    status = {"status": _status(res), "seconds": res["seconds"]}
    if out.is_file():
        info = json.loads(out.read_text())
        results.update({k: info.get(k) for k in ("gpu", "gpu_memory_gb", "capability", "torch", "cuda", "triton",
                                                  "transformers", "peft", "liger_kernel", "flash_attn", "python",
                                                  "platform", "peak_bf16_tflops", "copy_bandwidth_gbs",
                                                  "offload_extension", "nvidia_smi", "hf_packed_supported")})
    else:
        status["output_tail"] = _tail(res["output"])
    return status


def _status(res: dict) -> str:
    if res["timed_out"]:
        return "timeout"
    return "ok" if res["rc"] == 0 else f"failed (rc {res['rc']})"


# ---------------------------------------------------------------------------------------------
# Stage: GPU tests
# ---------------------------------------------------------------------------------------------


_RESULT_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def parse_junit(path: Path) -> dict | None:
    """Counts and failed test ids of a pytest --junitxml file (None if it is missing or unreadable)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed_ids = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failed_ids.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failed_ids.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    counts["total"] = sum(counts.values())
    counts["failed_ids"] = failed_ids
    return counts


def parse_verbose_output(text: str) -> dict:
    """Counts from pytest -v lines (used when the run was killed before writing its junit file)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed_ids = []
    for line in text.splitlines():
        match = _RESULT_LINE.match(line.strip())
        if not match:
            continue
        outcome = match.group(2)
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(outcome, "skipped")
        counts[key] += 1
        if key in ("failed", "errors"):
            failed_ids.append(match.group(1))
    counts["total"] = sum(counts.values())
    counts["failed_ids"] = failed_ids
    return counts


def stage_tests(results: dict, args, budget: float, work: Path) -> dict:
    junit = work / "tests-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-v", "-p", "no:cacheprovider", "-rfE",
           f"--junitxml={junit}"]
    res = run_logged(cmd, budget, env=_gpu_env(), log_path=work / "tests.log", echo=args.verbose)
    summary = parse_junit(junit) if not res["timed_out"] else None
    summary = summary or parse_verbose_output(res["output"] if not (work / "tests.log").is_file()
                                              else (work / "tests.log").read_text(errors="replace"))
    summary.update(status=_status(res), seconds=res["seconds"],
                   command="TRITON_INTERPRET=0 python -m pytest -m gpu tests")
    if res["rc"] not in (0, 5) or res["timed_out"]:
        summary["output_tail"] = _tail(res["output"])
    results["tests"] = summary
    return {"status": summary["status"], "seconds": res["seconds"]}


# ---------------------------------------------------------------------------------------------
# Stage: kernel micro-benchmarks
# ---------------------------------------------------------------------------------------------


_MEASURED = ("median_ms", "tflops", "gb_per_s", "peak_mem_gb")


def kernel_case(line: dict) -> dict:
    """One results row from a plugin line: op, system, shape, the measured figures and the rest of extra_info."""
    info = dict(line.get("extra_info") or {})
    stem = line.get("file", "").removesuffix(".py").removeprefix("bench_")
    op = info.pop("op", None) or stem
    if "block" in info:
        op = f"{op}/{info.pop('block')}"
    row = {"op": op, "system": info.pop("system", "?"), "shape": str(info.pop("shape", line.get("name", "")))}
    for key in _MEASURED:
        row[key] = info.pop(key, None)
    if row["median_ms"] is None and line.get("benchmark_median_s") is not None:
        row["benchmark_median_ms"] = line["benchmark_median_s"] * 1e3  # smoke mode: one untimed-ish round
    row["name"] = line.get("name")
    row["file"] = line.get("file")
    row["info"] = info
    return row


def kernel_files(args) -> list[Path]:
    return [Path(f) for f in args.kernel_files or []] or sorted((BENCH / "kernels").glob("bench_*.py"))


def stage_kernels(results: dict, args, budget: float, work: Path) -> dict:
    files = kernel_files(args)
    jsonl = work / "kernels.jsonl"
    jsonl.unlink(missing_ok=True)
    env = _gpu_env()
    env["LORAFUSE_BENCH_JSONL"] = str(jsonl)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ends = time.monotonic() + budget
    per_file = {}
    for index, file in enumerate(files):
        # an even share of what is left, so every op gets measured; time a file leaves unused carries on
        timeout = (ends - time.monotonic()) / (len(files) - index)
        if timeout < 5:
            per_file[file.name] = {"status": "skipped: no time left"}
            continue
        junit = work / f"kernels-{file.stem}.xml"
        cmd = [sys.executable, "-m", "pytest", str(file), "-q", "-p", "no:cacheprovider", "-p", "run",
               f"--junitxml={junit}"]
        res = run_logged(cmd, timeout, env=env, log_path=work / f"kernels-{file.stem}.log", echo=args.verbose)
        entry = {"status": _status(res), "seconds": res["seconds"]}
        counts = parse_junit(junit) if not res["timed_out"] else None
        if counts:
            entry.update({k: counts[k] for k in ("passed", "failed", "errors", "skipped")})
            entry["failed_ids"] = counts["failed_ids"]
        if res["rc"] not in (0, 5) or res["timed_out"]:
            entry["output_tail"] = _tail(res["output"], 2000)
        per_file[file.name] = entry
    lines = []
    if jsonl.is_file():
        for raw in jsonl.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(raw))
    results["kernels"] += [kernel_case(line) for line in lines if line.get("ok", True)]  # (--merge kept others)
    statuses = {e["status"] for e in per_file.values()}
    status = "ok" if statuses <= {"ok"} else ", ".join(sorted(statuses))
    return {"status": status, "files": per_file, "cases": len(lines)}


# ---------------------------------------------------------------------------------------------
# Stage: end to end (and max context), per model
# ---------------------------------------------------------------------------------------------


def _e2e_process(results: dict, args, model: str, cases: list[str], max_context: list[str], budget: float,
                 max_context_budget: float, work: Path, tag: str) -> dict:
    out = work / f"e2e-{model}-{tag}.json"
    out.unlink(missing_ok=True)
    warmup, steps = E2E_STEPS[args.quick]
    cmd = [sys.executable, str(BENCH / "e2e.py"), "--model", model, "--systems", *cases,
           "--max-context", *(max_context or ["none"]), "--tokens-per-step", str(args.tokens_per_step),
           "--warmup", str(warmup), "--steps", str(steps), "--time-budget-s", f"{budget:.0f}",
           "--max-context-budget-s", f"{max_context_budget:.0f}", "--out", str(out), *args.e2e_args]
    # e2e stops starting work at its own deadline; the kill is for a step that hangs past it
    res = run_logged(cmd, budget + 30, env=_gpu_env(), log_path=work / f"e2e-{model}-{tag}.log", echo=args.verbose)
    data = json.loads(out.read_text()) if out.is_file() else {}
    results["e2e"].extend(data.get("e2e", []))
    results["max_context"].extend(data.get("max_context", []))
    done = {r["case"] for r in data.get("e2e", [])}
    skipped = {s["case"] for s in data.get("skipped", [])}
    why = "timed out" if res["timed_out"] else f"process exited with rc {res['rc']}"
    for case in cases:
        if case not in done and case not in skipped:
            results["e2e"].append(_missing_row(args, model, case, f"no result: {why}"))
    stage = "peers" if tag in PEER_CASES else "e2e"  # what --merge keeps or replaces
    for skip in data.get("skipped", []):
        results.setdefault("e2e_skipped", []).append({"model": model, "stage": stage, **skip})
    for error in data.get("errors", []):
        results.setdefault("e2e_errors", []).append({"model": model, "stage": stage, **error})
    if data.get("command"):
        results.setdefault("e2e_commands", []).append({"stage": stage, "command": data["command"]})
    if data.get("config") and "e2e_config" not in results:
        results["e2e_config"] = {k: v for k, v in data["config"].items() if k != "model"}
    entry = {"status": _status(res), "seconds": res["seconds"]}
    if res["rc"] != 0 or res["timed_out"]:
        entry["output_tail"] = _tail(res["output"], 2000)
    return entry


def _missing_row(args, model: str, case: str, why: str) -> dict:
    """An e2e row for a case that produced nothing (its process died, or there was no time)."""
    system, checkpointing = case.split("-", 1) if case.startswith("lorafuse-") else (case, "hf")
    return {"model": model, "system": system, "case": case, "checkpointing": checkpointing,
            "tokens_per_step": args.tokens_per_step, "tokens_per_s": None, "step_time_s": None,
            "peak_mem_gb": None, "mfu": None, "step_losses": [], "oom": False, "error": why}


def _models(args, results: dict) -> list[str]:
    if args.models:
        return list(args.models)
    memory = results.get("gpu_memory_gb") or 0
    first = MODEL_FOR_SMALL_GPUS if memory and memory < SMALL_GPU_GIB else "llama-3.1-8b"
    return [first] + ([m for m in EXTRA_MODELS if m != first] if args.all_models else [])


def stage_e2e(results: dict, args, budget: float, work: Path) -> dict:
    """Per model, two processes: stock (+ its max-context search, + hf_packed) with 40% of the model's share,
    then lorafuse none / recompute / offload (+ the max-context searches) with the rest. The models share
    the budget evenly; a later model is skipped when less than 2 minutes are left."""
    ends = time.monotonic() + budget
    runs = {}
    models = _models(args, results)
    for index, model in enumerate(models):
        left = ends - time.monotonic()
        if index > 0 and left < 120:
            runs[model] = {"status": "skipped: no time left"}
            continue
        share = left / (len(models) - index)
        hf_budget = 0.4 * share
        mc_stock = [c for c in args.max_context if c == "stock"]
        mc_lorafuse = [c for c in args.max_context if c.startswith("lorafuse-")]
        # stock, its max-context search, then hf_packed (skipped by e2e.py where transformers cannot)
        runs[f"{model}/stock"] = _e2e_process(results, args, model, ["stock", "hf_packed"], mc_stock, hf_budget,
                                              0.45 * hf_budget, work, "stock")
        # what the HF process left unused goes to lorafuse; later models keep their shares
        lorafuse_budget = ends - time.monotonic() - share * (len(models) - index - 1)
        lorafuse_cases = ["lorafuse-none", "lorafuse-recompute", "lorafuse-offload"]
        if lorafuse_budget < 30:
            runs[f"{model}/lorafuse"] = {"status": "skipped: no time left"}
            results["e2e"] += [_missing_row(args, model, case, "skipped: no time left") for case in lorafuse_cases]
            continue
        runs[f"{model}/lorafuse"] = _e2e_process(results, args, model, lorafuse_cases, mc_lorafuse,
                                                 lorafuse_budget, 0.3 * lorafuse_budget, work, "lorafuse")
    statuses = {r["status"] for r in runs.values()}
    return {"status": "ok" if statuses <= {"ok"} else ", ".join(sorted(statuses)), "runs": runs}


PEER_CASES = ("liger",)


def available_peers(results: dict) -> list[str]:
    """Peers that need their own process (hf_packed runs with stock, on the same model)."""
    return ["liger"] if results.get("liger_kernel") else []


def stage_peers(results: dict, args, budget: float, work: Path) -> dict:
    """liger (where installed) on the first model."""
    peers = available_peers(results)
    if not peers:
        return {"status": "skipped: no peer available"}
    model = _models(args, results)[0]
    ends = time.monotonic() + budget
    runs = {}
    for index, peer in enumerate(peers):
        left = (ends - time.monotonic()) / (len(peers) - index)
        if left < 40:
            runs[peer] = {"status": "skipped: no time left"}
            continue
        runs[peer] = _e2e_process(results, args, model, [peer], [], left, 0, work, peer)
    statuses = {r["status"] for r in runs.values()}
    return {"status": "ok" if statuses <= {"ok"} else ", ".join(sorted(statuses)), "runs": runs}


def stage_checkpointing(results: dict, args, budget: float, work: Path) -> dict:
    out = work / "checkpointing.json"
    cmd = [sys.executable, str(BENCH / "bench_checkpointing.py"), "--layers", "8", "--tokens", "16384", "32768",
           "--no-search", "--out", str(out)]
    res = run_logged(cmd, budget, env=_gpu_env(), log_path=work / "checkpointing.log", echo=args.verbose)
    if out.is_file():
        data = json.loads(out.read_text())
        results["checkpointing"] = {k: data.get(k) for k in ("config", "rows", "offload_vs_recompute",
                                                             "offload_backend", "command")}
    entry = {"status": _status(res), "seconds": res["seconds"]}
    if res["rc"] != 0 or res["timed_out"]:
        entry["output_tail"] = _tail(res["output"], 2000)
    return entry


STAGE_FUNCS = {"env": stage_env, "tests": stage_tests, "kernels": stage_kernels, "e2e": stage_e2e,
               "peers": stage_peers, "checkpointing": stage_checkpointing}


# ---------------------------------------------------------------------------------------------
# Results file
# ---------------------------------------------------------------------------------------------


def gpu_slug(name: str | None) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"; no GPU -> "cpu"."""
    if not name:
        return "cpu"
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").split("-")
    return "-".join(w for w in words if w not in ("nvidia", "geforce", "tesla")) or "gpu"


def results_path(results: dict, args) -> Path:
    name = args.name or f"{gpu_slug(results.get('gpu'))}-{results['date']}{'-quick' if args.quick else ''}"
    return Path(args.out) / f"{name}.json"


def write_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)


def carry_over(previous: dict, results: dict, selected: list[str], kernel_files: list[str]) -> None:
    """--merge: what an earlier run into the same file measured in the stages not run now stays, so a
    run split over several calls (each under a time limit) still makes one results file. `calls` lists
    every call's command, commit and stages."""
    rerun = set(selected)
    if "tests" not in rerun:
        results["tests"] = previous.get("tests")
    if "kernels" not in rerun:
        results["kernels"] = previous.get("kernels", [])
    else:  # rows of the kernel files not run this time stay
        results["kernels"] = [row for row in previous.get("kernels", []) if row.get("file") not in kernel_files]
    if "checkpointing" not in rerun and "checkpointing" in previous:
        results["checkpointing"] = previous["checkpointing"]
    if "e2e" not in rerun:
        results["max_context"] = previous.get("max_context", [])
        if "e2e_config" in previous:
            results["e2e_config"] = previous["e2e_config"]
    kept = [row for row in previous.get("e2e", [])
            if ("peers" if row.get("case") in PEER_CASES else "e2e") not in rerun]
    results["e2e"] = kept + results["e2e"]
    for key in ("e2e_skipped", "e2e_errors", "e2e_commands"):
        kept = [item for item in previous.get(key, []) if item.get("stage", "e2e") not in rerun]
        if kept or key in results:
            results[key] = kept + results.get(key, [])
    results["stages"] = {**{k: v for k, v in previous.get("stages", {}).items() if k not in rerun},
                         **results["stages"]}
    results["calls"] = previous.get("calls") or [_call(previous, list(previous.get("stages", {})))]
    results["calls"].append(_call(results, selected))


def _call(results: dict, stages: list[str]) -> dict:
    return {"command": results.get("command"), "git": results.get("git"), "started_at": results.get("started_at"),
            "stages": list(stages)}


def _git() -> dict:
    out = {}
    with contextlib.suppress(Exception):
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10)
        out["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    return out


def new_results(args, argv) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    command = "python bench/run.py" + ("" if not argv else " " + shlex.join(argv))
    return {"schema": 1, "command": command, "date": now.strftime("%Y-%m-%d"),
            "started_at": now.isoformat(timespec="seconds"), "quick": args.quick, "git": _git(),
            "gpu": None, "torch": None, "triton": None, "transformers": None, "peft": None,
            "peak_bf16_tflops": None, "copy_bandwidth_gbs": None,
            "tokens_per_step": args.tokens_per_step, "stages": {},
            "tests": None, "kernels": [], "e2e": [], "max_context": []}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _stage_budget(text: str) -> tuple[str, float]:
    stage, _, seconds = text.partition("=")
    if stage not in BUDGETS or stage == "total":
        raise argparse.ArgumentTypeError(f"{text!r}: a stage with its own budget is one of "
                                         f"{', '.join(k for k in BUDGETS if k != 'total')}")
    try:
        value = float(seconds)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: SECONDS must be a number above 0")
    return stage, value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="about 5 minutes: fewer steps, shorter searches")
    parser.add_argument("--out", default=str(BENCH / "results"), help="results directory")
    parser.add_argument("--name", default=None, help="results file name without .json (default <gpu>-<date>)")
    parser.add_argument("--only", nargs="+", choices=STAGES, default=None, help="run only these stages (env always)")
    parser.add_argument("--skip", nargs="+", choices=STAGES, default=[], help="stages to leave out")
    parser.add_argument("--with-checkpointing", action="store_true",
                        help="also run bench/bench_checkpointing.py (8 layers, no search)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="the whole run (default 570, quick 330)")
    parser.add_argument("--stage-budget", nargs="+", default=[], metavar="STAGE=SECONDS", type=_stage_budget,
                        help="a stage's own budget instead of its default, e.g. tests=500 (not e2e/peers: they "
                             "get what is left)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="e2e models (default llama-3.1-8b; llama-3.2-1b on GPUs under 40 GiB)")
    parser.add_argument("--all-models", action="store_true",
                        help="also Qwen2.5-7B, Mistral-7B and Llama-3.2-1B, as time allows")
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--max-context", nargs="*", default=["stock", "lorafuse-recompute", "lorafuse-offload"])
    parser.add_argument("--kernel-files", nargs="+", default=None, help="kernel benchmark files (default all)")
    parser.add_argument("--e2e-args", default="", help="extra arguments for every bench/e2e.py call (quoted)")
    parser.add_argument("--readme", default=None, help="also refresh this README's results section")
    parser.add_argument("--logs", default=None,
                        help="keep every stage's log and raw output in this folder (default: a temporary one)")
    parser.add_argument("--merge", action="store_true",
                        help="keep what an earlier run into the same results file measured in the stages not run now")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=True,
                        help="echo every stage's output")
    parser.add_argument("--worker", choices=["env"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.e2e_args = shlex.split(args.e2e_args)
    return args


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    if args.worker == "env":
        worker_env(args.worker_out)
        return None
    given = sys.argv[1:] if argv is None else list(argv)
    budget_index = 1 if args.quick else 0
    total = args.time_budget_s or BUDGETS["total"][budget_index]
    started = time.monotonic()
    deadline = started + total
    selected = [s for s in STAGES if (args.only is None or s in args.only or s == "env") and s not in args.skip]
    if "checkpointing" in selected and not (args.with_checkpointing or (args.only and "checkpointing" in args.only)):
        selected.remove("checkpointing")
    if "env" not in selected:
        selected.insert(0, "env")  # the GPU name names the file
    stage_budgets = dict(args.stage_budget)
    results = new_results(args, given)
    if args.logs:
        work = Path(args.logs)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="lorafuse-bench-"))
    results["logs"] = str(work)
    path = None
    for stage in selected:
        left = deadline - time.monotonic() - REPORT_RESERVE_S
        reserve = BUDGETS["checkpointing"][budget_index] if "checkpointing" in selected else 0.0
        if stage == "e2e":  # gets all the time but what the later stages are promised
            if "peers" in selected:
                reserve += PEER_BUDGET_S[budget_index] * len(available_peers(results))
            budget = left - reserve
        elif stage == "peers":
            budget = left - reserve
        else:
            budget = min(stage_budgets.get(stage, BUDGETS[stage][budget_index]), left)
        if budget < 20:
            results["stages"][stage] = {"status": "skipped: no time left"}
            continue
        print(f"\n===== [{stage}] budget {budget:.0f} s =====", flush=True)
        stage_started = time.monotonic()
        try:
            results["stages"][stage] = STAGE_FUNCS[stage](results, args, budget, work)
        except Exception as error:  # noqa: BLE001 - a stage failing must not lose the others
            results["stages"][stage] = {"status": f"error: {type(error).__name__}: {error}"}
        results["stages"][stage].setdefault("seconds", time.monotonic() - stage_started)
        results["stages"][stage]["budget_s"] = budget
        results["duration_s"] = time.monotonic() - started
        path = results_path(results, args)
        if stage == "env" and args.merge and path.is_file():
            carry_over(json.loads(path.read_text(encoding="utf-8")), results, selected,
                       [f.name for f in kernel_files(args)])
        write_results(results, path)
        print(f"===== [{stage}] {results['stages'][stage]['status']} "
              f"({time.monotonic() - stage_started:.0f} s); results in {path}", flush=True)
    results["duration_s"] = time.monotonic() - started
    path = results_path(results, args)
    write_results(results, path)
    sys.path.insert(0, str(BENCH))
    import report  # it puts bench/harness on the path
    from report_e2e import e2e_table, max_context_table
    from report_page import tests_lines

    print("\n" + "\n".join(e2e_table(results) + max_context_table(results) + [""] + tests_lines(results)))
    if not args.no_report:
        try:
            report.main([str(path)] + (["--readme", args.readme] if args.readme else []))
        except (Exception, SystemExit) as error:  # noqa: BLE001 - the results file is what matters
            print(f"[report] failed: {type(error).__name__}: {error}")
    print(f"\nresults: {path} ({results['duration_s']:.0f} s)")
    return path


if __name__ == "__main__":
    main()
