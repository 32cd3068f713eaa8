"""The env stage of bench/run.py: GPU name, versions, the measured bf16 matmul peak and copy bandwidths,
and the offload extension built once so no later stage pays for it. It runs as a worker subprocess
(`run.py --worker env`): the parent never touches CUDA, so its context takes no memory from the benchmarks."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from stage_process import BENCH, gpu_env, run_logged, status, tail

ENV_KEYS = ("gpu", "gpu_memory_gb", "capability", "torch", "cuda", "triton", "transformers", "peft", "liger_kernel",
            "flash_attn", "python", "platform", "peak_bf16_tflops", "copy_bandwidth_gbs", "offload_extension",
            "nvidia_smi", "hf_packed_supported", "bitsandbytes")


def worker_env(out: str) -> None:
    import platform

    import torch

    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                  "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "peft", "liger_kernel", "flash_attn", "pytest_benchmark", "bitsandbytes"):
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
        from gpu_peak import measured_peak_flops

        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count)
        info["nvidia_smi"] = _nvidia_smi()
        info["peak_bf16_tflops"] = measured_peak_flops(device) / 1e12  # as bench/e2e.py measures it
        info["copy_bandwidth_gbs"] = copy_bandwidth(device)
        torch.cuda.empty_cache()
    else:
        info.update(peak_bf16_tflops=None, copy_bandwidth_gbs=None)
    try:
        from lorafuse.engine.extension import extension_status, load_extension

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
    res = run_logged([sys.executable, str(BENCH / "run.py"), "--worker", "env", "--worker-out", str(out)], budget,
                     env=gpu_env(), log_path=work / "env.log", echo=args.verbose)
    entry = {"status": status(res), "seconds": res["seconds"]}
    if out.is_file():
        info = json.loads(out.read_text())
        results.update({k: info.get(k) for k in ENV_KEYS})
    else:
        entry["output_tail"] = tail(res["output"])
    return entry
