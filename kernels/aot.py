"""Compile every Triton kernel for NVIDIA GPUs without one (ahead of time, no launch), and the static gate.

`python -m lorafuse.kernels.aot` builds each kernel variant that a kernel module lists in its AOT_SPECS for
sm_80 (A100) and sm_90 (H100/H200) and prints the shared memory each needs. The CPU test suite runs it, so a
kernel that the interpreter accepts but the GPU compiler rejects (tl.dot shapes, layouts, too much shared
memory) fails in CI, not on a rented GPU.

`python -m lorafuse.kernels.aot --report` compiles what a training step really launches (aot_capture.py: one
decoder layer and the loss head of Llama-3.1-8B at 16,384 tokens, LoRA r=16, bf16, of a Gemma-2 local
layer for head dim 256, sliding window, softcap and GeGLU, and Llama-3.2-1B's attention for head dim 64), every
config of each autotune list for that
architecture, specialised as the launcher specialises; then per variant and architecture: registers, spill
bytes, shared memory, blocks per SM and the tensor-core instruction shapes (aot_static.py). It writes
bench/results/static-<date>.json and a markdown table beside it (bench/harness/report_static.py; with
--readme, the README's summary). `--gate` compiles the same and only checks: exit 1 when a shipped config
spills or needs more shared memory than the architecture has.

Each AOT_SPECS variant is an _launch.AotSpec, written with _launch.aot_spec: the kernel, the Triton type of
each argument, the constexpr values, and the launch options of an autotune config.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lorafuse._interpreter import interpreter_requested

from .aot_static import SHARED_LIMIT

ARCHS = (80, 90)
MODULES = ("lora_linear", "fused_linear_cross_entropy", "varlen_attention", "rope", "rms_norm", "swiglu", "nf4")


def compile_spec(spec, arch: int):
    """Compile an _launch.AotSpec for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget

    # A real launch tells the compiler which pointers are 16-byte aligned (torch's allocations are):
    # claim it for every pointer. Integer arguments (strides) stay unspecialised, so loads whose
    # vectorisation needs aligned strides compile here as they would for odd strides.
    attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(spec.signature.values()) if ty.startswith("*")}
    src = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))


# ----------------------------------------------------------------------------- launches, as a launch compiles them

_BINDERS: dict = {}


def specialise(fn, args: tuple, kwargs: dict, arch: int) -> dict:
    """Triton's launcher on these arguments for sm_<arch>: the signature, constexprs, attributes (divisibility)
    and options a real launch would compile with."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if (fn, arch) not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[fn, arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[fn, arch]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return {"module": fn.module, "kernel": fn.__name__, "arch": arch, "signature": signature,
            "constexprs": constexprs, "attrs": attrs, "options": dict(options.__dict__)}


def arch_configs(rec, arch: int) -> list:
    """The configs the launch's autotuner tries on sm_<arch>: its list for that architecture
    (_launch.arch_autotune), after its own pruning for these arguments."""
    from . import _launch

    tuner = rec.tuner
    by_arch = getattr(tuner, "arch_configs", None)
    configs = list(by_arch[arch]) if by_arch else list(tuner.configs)
    if tuner.early_config_prune:
        # a kernel's own pruning may depend on the architecture (_launch.device_arch): it sees this one
        saved, _launch.ASSUMED_ARCH = _launch.ASSUMED_ARCH, arch
        try:
            configs = tuner.early_config_prune(configs, dict(zip(tuner.arg_names, rec.args)), **rec.kwargs)
        finally:
            _launch.ASSUMED_ARCH = saved
    return configs


def launch_jobs(launches, arch: int, case: str, seen: set) -> list[dict]:
    """One compile job per distinct (kernel, specialisation, config) among the launches (not in `seen`)."""
    jobs = []
    for rec in launches:
        configs = arch_configs(rec, arch) if rec.tuner is not None else [None]
        for config in configs:
            kwargs = dict(rec.kwargs)
            if config is not None:
                kwargs.update(config.all_kwargs())
            named = {**dict(zip(rec.fn.arg_names, rec.args)), **kwargs}
            for name, rule in rec.heuristics.items():
                kwargs[name] = named[name] = rule(named)
            job = specialise(rec.fn, rec.args, kwargs, arch)
            key = json.dumps([job["kernel"], job["signature"], repr(sorted(job["constexprs"].items())),
                              repr(sorted(job["attrs"].items())), repr(sorted(job["options"].items()))], default=str)
            if key in seen:
                continue
            seen.add(key)
            shown = {k: v for k, v in kwargs.items() if k.isupper() and v is not False and k != "DOT_PRECISION"}
            job["label"] = f"{job['kernel']} " + ",".join(f"{k}={v}" for k, v in shown.items())
            job["config"] = {"warps": kwargs.get("num_warps", 4), "stages": kwargs.get("num_stages", 3)}
            job["case"] = case
            jobs.append(job)
    return jobs


def compile_job(job: dict) -> dict:
    """Compile one job (in a worker process) and measure it; an error is reported, not raised."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.errors import CompileTimeAssertionFailure

    from . import aot_static
    from ._launch import jit_function

    fn = jit_function(getattr(importlib.import_module(job["module"]), job["kernel"]))
    src = triton.compiler.ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    arch = job["arch"]
    out = {k: job[k] for k in ("case", "label", "kernel", "arch", "config")}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        # Triton prints its own `ptxas -v` log when asked: the figures of the very cubin it built
        with _knob(triton.knobs.nvidia, "dump_ptxas_log", True), contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job["options"])
    except CompileTimeAssertionFailure as e:  # the autotuner skips such a config: not shipped at this shape
        return {**out, "refused": str(e).splitlines()[-1][:200]}
    except Exception as e:  # noqa: BLE001 - every failing variant is reported
        return {**out, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    stats = aot_static.parse_ptxas(log.getvalue())
    if stats is None:  # from Triton's cache: no log, so ptxas again with Triton's flags
        stats = aot_static.ptxas_stats(compiled.asm["ptx"], arch)
    mma, source = aot_static.mma_shapes(compiled) if job.get("mma", True) else ({}, "-")
    shared = compiled.metadata.shared
    warps = compiled.metadata.num_warps
    out.update(stats, shared=shared, spill_bytes=stats["spill_stores"] + stats["spill_loads"], mma=mma,
               mma_from=source, ctas_per_sm=aot_static.ctas_per_sm(arch, stats["registers"], warps, shared),
               seconds=round(time.perf_counter() - t0, 1))
    out["ok"] = out["spill_bytes"] == 0 and shared <= SHARED_LIMIT[arch]
    return out


@contextlib.contextmanager
def _knob(group, name, value):
    old = getattr(group, name)
    setattr(group, name, value)
    try:
        yield
    finally:
        setattr(group, name, old)


def headline_jobs() -> list[dict]:
    from . import aot_capture as cap

    jobs, seen = [], set()
    for case, shape, prefix in (("llama", cap.LLAMA_31_8B, ""), ("gemma2-local", cap.GEMMA_2_9B, ""),
                                ("head-dim-64", cap.LLAMA_32_1B, cap.ATTENTION_ONLY)):
        for arch in ARCHS:
            launches = [rec for rec in cap.training_step(shape, arch) if rec.fn.__name__.startswith(prefix)]
            jobs += launch_jobs(launches, arch, case, seen)
    return jobs


def run_jobs(jobs: list[dict], workers: int, echo=print) -> list[dict]:
    results = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for res in pool.map(compile_job, jobs):
            results.append(res)
            echo(_line(res))
    return results


def _line(res: dict) -> str:
    head = f"sm_{res['arch']} {res['label']} w{res['config']['warps']}s{res['config']['stages']}"
    if "error" in res:
        return f"FAIL {head}: {res['error']}"
    if "refused" in res:
        return f"skip {head}: refused at compile time ({res['refused']})"
    mma = " ".join(f"{k}x{v}" for k, v in sorted(res["mma"].items()))
    return (f"{'ok  ' if res['ok'] else 'FAIL'} {head}: regs={res['registers']} spill={res['spill_bytes']}B "
            f"shared={res['shared']}B ctas/SM={res['ctas_per_sm']} {mma}")


def gate_failures(results: list[dict]) -> list[dict]:
    return [r for r in results if "error" in r or ("refused" not in r and not r["ok"])]


# ----------------------------------------------------------------------------- commands


def _check_spec(job: tuple[str, int, int]) -> tuple[int, str]:
    """Compile AOT_SPECS[index] of one module for one architecture: (failures, the line to print)."""
    name, index, arch = job
    spec = importlib.import_module(f"lorafuse.kernels.{name}").AOT_SPECS[index]
    label = f"{name}.{spec.kernel.__name__}"
    shown = ",".join([f"{k}={v}" for k, v in spec.constexprs.items() if k.isupper()]
                     + [f"{k}={v}" for k, v in spec.options.items()])
    t0 = time.perf_counter()
    try:
        compiled = compile_spec(spec, arch)
    except Exception as e:  # report every failing variant, not just the first
        return 1, f"FAIL sm_{arch} {label} [{shown}]: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    shared = compiled.metadata.shared
    ok = shared <= SHARED_LIMIT[arch]
    return int(not ok), (f"{'ok  ' if ok else 'FAIL'} sm_{arch} {label} [{shown}] shared={shared}B "
                         f"warps={compiled.metadata.num_warps} {time.perf_counter() - t0:.1f}s")


def check_specs(workers: int = 1) -> int:
    """Every module's AOT_SPECS for every architecture, compiled by `workers` processes."""
    jobs = [(name, index, arch) for name in MODULES
            for index in range(len(getattr(importlib.import_module(f"lorafuse.kernels.{name}"), "AOT_SPECS", ())))
            for arch in ARCHS]
    failures = 0
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for failed, line in pool.map(_check_spec, jobs):
            failures += failed
            print(line)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


def environment() -> dict:
    import torch
    import triton

    from . import aot_static

    proc = __import__("subprocess").run([aot_static.ptxas_path(90), "--version"], capture_output=True, text=True)
    return {"triton": triton.__version__, "torch": torch.__version__,
            "ptxas": proc.stdout.strip().splitlines()[-1] if proc.stdout else "?"}


def main(argv=None) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="the static report of the headline launches")
    parser.add_argument("--gate", action="store_true", help="compile the headline launches; fail on spills or "
                                                            "shared memory over the limit")
    parser.add_argument("--out", default="bench/results", help="folder of the report's files")
    parser.add_argument("--name", default=None, help="file name without .json (default static-<date>)")
    parser.add_argument("--readme", default=None, help="refresh this README's static summary")
    parser.add_argument("--baseline", default=None,
                        help="an earlier static-*.json in the same folder (before a change), shown beside this one")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(argv)
    if interpreter_requested():
        print("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU", file=sys.stderr)
        return 2
    if not (args.report or args.gate):
        return check_specs(args.jobs)
    started = time.perf_counter()
    jobs = headline_jobs()
    for job in jobs:
        job["mma"] = args.report  # the gate needs no disassembly
    results = run_jobs(jobs, args.jobs)
    failures = gate_failures(results)
    print(f"{len(results)} variant(s), {len(failures)} failure(s), {time.perf_counter() - started:.0f} s")
    if args.report:
        date = datetime.date.today().isoformat()
        data = {"kind": "static", "date": date, "headline": "Llama-3.1-8B, 16,384 tokens per micro-batch, LoRA "
                "r=16 on all seven projections, bf16; a Gemma-2-9B local layer (head dim 256, window, softcap, "
                "GeGLU); Llama-3.2-1B's attention (head dim 64)",
                "command": "python -m lorafuse.kernels.aot --report", "environment": environment(),
                "shared_limit": {str(a): SHARED_LIMIT[a] for a in ARCHS}, "variants": results}
        if args.baseline:
            data["baseline"] = args.baseline
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{args.name or 'static-' + date}.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"[static] {path}")
        harness = Path(__file__).resolve().parents[1] / "bench" / "harness"  # a checkout's; an install has none
        if not (harness / "report_static.py").is_file():
            print("[static] no bench/harness here: the markdown is left to bench/harness/report_static.py")
            return 1 if failures else 0
        sys.path.insert(0, str(harness))
        from report_static import write_static_report

        for line in write_static_report(path, args.readme):
            print(f"[static] {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
