"""How bench/run.py runs a stage: a subprocess in its own process group, its output echoed and logged, killed
at its time limit; the environment of every GPU stage; and where the benchmark files are."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HARNESS = Path(__file__).resolve().parent
BENCH = HARNESS.parent
ROOT = BENCH.parent


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


def gpu_env() -> dict:
    """Environment of every GPU stage: compiled kernels, no interpreter."""
    env = {"TRITON_INTERPRET": "0", "PYTHONSAFEPATH": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    return env


def tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


def status(res: dict) -> str:
    """A finished run_logged's outcome in the results file: ok, timeout or failed (rc N)."""
    if res["timed_out"]:
        return "timeout"
    return "ok" if res["rc"] == 0 else f"failed (rc {res['rc']})"


def overall(entries: dict) -> str:
    """A stage's status from those of its runs: ok, or every other status there was."""
    statuses = {e["status"] for e in entries.values()}
    return "ok" if statuses <= {"ok"} else ", ".join(sorted(statuses))


def outcome(res: dict) -> dict:
    """A stage's entry for one finished run: its status and time, and its output's end when it failed."""
    entry = {"status": status(res), "seconds": res["seconds"]}
    if res["rc"] != 0 or res["timed_out"]:
        entry["output_tail"] = tail(res["output"], 2000)
    return entry
