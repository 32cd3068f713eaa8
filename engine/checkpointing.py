"""Activation checkpointing per decoder layer, with offload of the kept layer input to host memory.

Modes, per decoder layer (`LayerCheckpointer.set_modes`):
  "none"       plain call: every activation the layer saves for backward stays on the device.
  "recompute"  torch.utils.checkpoint (non-reentrant): only the layer input (and the constant
               tensor arguments) stay on the device; backward reruns the layer first.
  "offload"    recompute, and the layer input itself goes to a pinned host arena while forward
               goes on; it comes back before that layer's backward, prefetched one layer ahead.

How offload works. The checkpoint's saved inputs pass through torch.autograd.graph
.saved_tensors_hooks: the pack hook sends the layer input (only that tensor, only when it is at
least `min_offload_bytes`, contiguous, on the arena's device) to the arena and keeps a handle;
everything else is kept as is. In backward, when layer i's output gradient is ready (a tensor hook
on the output), the nearest offloaded layer below i is prefetched; the unpack hook of layer i
fetches its own input (already on its way) and prefetches the next one. So at most two
offloaded inputs are on the device at a time: the one in use and the one arriving.

The arena (csrc/offload_arena.cpp, torch.classes.lorafuse.OffloadArena) is one pinned host region,
exact-size bump allocation, reset every step and regrown only when a step needs more than any
before; copies run on a side stream ordered by CUDA events, and nothing waits on the host.
TorchOffloadArena below is its pure-PyTorch twin (same methods, errors and policy), used when the
extension cannot be built; it gets pinned memory from torch's caching host allocator, which rounds
each request up to a power of two, the cost the C++ arena avoids.

The extension builds on first use with CMake into $LORAFUSE_CACHE/ext/<key> (default
~/.cache/lorafuse/ext/<key>); the key hashes the sources and the torch version, so `pip install -e .`
stays pure Python and a changed source or torch rebuilds once. The library registers a torch
custom class and links only torch's C++ libraries (no Python C API), so one build serves every
Python version. When it cannot build (no cmake, no compiler, ...) one log line says so and
offload runs on TorchOffloadArena.

Memory model of the policy (plan_checkpointing), for T tokens, K = T * bytes a kept layer saves
per token, I = T * bytes of the layer input per token. While layer j runs backward, the device
holds what the layers below j keep (K for "none", I for "recompute", 0 for "offload"), layer j's
own (K for "none"; its input plus its recomputed activations, I + K, otherwise), and one
prefetched input (I) when an offloaded layer is below j. The peak is the largest of these over j
(j = n-1 is the end of forward). Keeping the top layers and offloading the bottom ones is best:
kept activations are freed before the layers below are recomputed, and the bottom inputs are
needed last, which leaves the most time to bring them back.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint

logger = logging.getLogger(__name__)

MODES = ("none", "recompute", "offload")
DEFAULT_MIN_OFFLOAD_BYTES = 1 << 20  # a smaller layer input is not worth a copy and a buffer
# Pinned host memory an offload arena takes at most by default: half of what is free, so the page cache,
# the data loader and a VM's host side keep room (a pinned page cannot be swapped or reclaimed).
HOST_SHARE = 0.5


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo, else the physical memory."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_host_limit() -> int:
    return int(HOST_SHARE * available_host_bytes())
DEFAULT_MIN_CHUNK_BYTES = 64 << 20  # overflow chunks of the first step: few host allocations
_ALIGN = 256  # block starts in the arena (the C++ arena uses the same)
_LIB_NAME = "liblorafuse_C.so"
_BUILD_RECIPE = 1  # bump when the build procedure changes, to rebuild cached libraries
_RETRY_FAILED_BUILD_S = 600  # a failed build is not retried by other processes for this long


# ----------------------------------------------------------------------------------------------
# The C++ extension: build on first use, load once per process
# ----------------------------------------------------------------------------------------------


class ExtensionBuildError(RuntimeError):
    """The offload extension could not be built; the message names the cause and the log."""


def _source_root() -> Path | None:
    """The directory holding CMakeLists.txt and csrc/ ($LORAFUSE_SOURCE_DIR, else the repository)."""
    candidates = [Path(os.environ["LORAFUSE_SOURCE_DIR"])] if os.environ.get("LORAFUSE_SOURCE_DIR") else []
    candidates.append(Path(__file__).resolve().parent.parent)
    for root in candidates:
        if (root / "CMakeLists.txt").is_file() and (root / "csrc" / "offload_arena.cpp").is_file():
            return root
    return None


def extension_cache_dir() -> Path:
    """Where built extensions live: $LORAFUSE_CACHE/ext, else $XDG_CACHE_HOME or ~/.cache, /lorafuse/ext."""
    base = os.environ.get("LORAFUSE_CACHE")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lorafuse")
    return Path(base) / "ext"


def _build_key(root: Path) -> str:
    digest = hashlib.sha256()
    for path in [root / "CMakeLists.txt", *sorted((root / "csrc").iterdir())]:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{sys.platform}|{platform.machine()}|"
                  f"{_BUILD_RECIPE}".encode())
    return digest.hexdigest()[:16]


def _find_tool(name: str) -> str | None:
    """cmake / ninja: on PATH, beside this Python (a venv's bin), or from their PyPI packages."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        module = __import__(name)
        bin_dir = getattr(module, "CMAKE_BIN_DIR", None) or getattr(module, "BIN_DIR", None)
    except Exception:
        return None
    return shutil.which(name, path=str(bin_dir)) if bin_dir else None


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _first_error(output: str) -> str:
    """The first line of build output that names an error (with the line after a trailing colon)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "error" in line.lower():
            if line.endswith(":") and index + 1 < len(lines):
                line = f"{line} {lines[index + 1]}"
            return line[:200]
    return lines[-1][:200] if lines else "no output"


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialises builds of one key across processes (several ranks starting at once)."""
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_extension(cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Builds (or finds in the cache) liblorafuse_C.so and returns its path; does not load it.

    Raises ExtensionBuildError with the cause; the full CMake output is kept in a log file beside
    the cache entry.
    """
    root = _source_root()
    if root is None:
        raise ExtensionBuildError("sources not found (csrc/ and CMakeLists.txt; set LORAFUSE_SOURCE_DIR)")
    cmake = _find_tool("cmake")
    if cmake is None:
        raise ExtensionBuildError("cmake not found (pip install cmake ninja)")
    key = _build_key(root)
    cache = Path(cache_dir) if cache_dir is not None else extension_cache_dir()
    target_dir = cache / key
    library = target_dir / _LIB_NAME
    if library.is_file() and not force:
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f"{key}.lock"):
        if library.is_file() and not force:
            return library  # another process built it while this one waited
        failed = cache / f"{key}.failed"
        if not force and failed.is_file() and time.time() - failed.stat().st_mtime < _RETRY_FAILED_BUILD_S:
            # Several ranks starting together: one build attempt, not one per rank.
            raise ExtensionBuildError(failed.read_text().strip() + " (recent failure, not retried)")
        build_dir = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=cache))
        log_path = cache / f"{key}-build.log"
        configure = [cmake, "-S", str(root), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                     f"-DLORAFUSE_PYTHON={sys.executable}"]
        ninja = _find_tool("ninja")
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        nvcc = _find_nvcc() if torch.version.cuda else None
        if nvcc:
            configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        log = []
        try:
            for command in (configure, [cmake, "--build", str(build_dir), "--parallel"]):
                result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        timeout=1800)
                log.append("$ " + " ".join(command) + "\n" + result.stdout)
                if result.returncode != 0:
                    cause = _first_error(result.stdout)
                    raise ExtensionBuildError(f"{Path(command[0]).name} failed ({cause}); log: {log_path}")
            target_dir.mkdir(parents=True, exist_ok=True)
            staging = target_dir / f"{_LIB_NAME}.{os.getpid()}.tmp"
            shutil.copy2(build_dir / _LIB_NAME, staging)
            os.replace(staging, library)  # atomic: a reader sees no library or a whole one
            failed.unlink(missing_ok=True)
        except (OSError, subprocess.SubprocessError, ExtensionBuildError) as error:
            if not isinstance(error, ExtensionBuildError):
                error = ExtensionBuildError(f"build failed ({error}); log: {log_path}")
            with contextlib.suppress(OSError):
                failed.write_text(str(error))
            raise error from None
        finally:
            log_path.write_text("\n".join(log))
            shutil.rmtree(build_dir, ignore_errors=True)
    return library


_extension_lock = threading.Lock()
_extension: dict[str, Any] = {"path": None, "error": None, "warned_cpu_only": False, "disabled_said": False}


def _registered() -> bool:
    try:
        torch.classes.lorafuse.OffloadArena  # noqa: B018 - raises when the class is not registered
        return True
    except (RuntimeError, AttributeError):
        return False


def _disabled_by_env() -> bool:
    return os.environ.get("LORAFUSE_EXTENSION", "1").strip().lower() in ("0", "off", "false", "no")


def load_extension() -> bool:
    """Builds if needed and loads the extension once per process; False (and one log line) if it cannot.

    LORAFUSE_EXTENSION=0 skips it. A library that registered the classes already (loaded by
    another path) is kept: loading a second one would register the namespace twice.
    """
    with _extension_lock:
        if _extension["path"] is not None:
            return True
        if _disabled_by_env():
            # Not remembered as a failure: the setting is read again at the next call.
            if not _extension["disabled_said"]:
                _extension["disabled_said"] = True
                logger.warning("lorafuse: C++ offload extension disabled by LORAFUSE_EXTENSION; "
                               "offload uses the pure-PyTorch path")
            return False
        if _extension["error"] is not None:
            return False
        if _registered():
            _extension["path"] = "(loaded before)"
            return True
        try:
            library = build_extension()
            torch.ops.load_library(str(library))
            if not _registered():
                raise ExtensionBuildError(f"{library} did not register torch.classes.lorafuse.OffloadArena")
            _extension["path"] = str(library)
            return True
        except Exception as error:  # any failure means: run the pure-PyTorch path, and say so once
            _extension["error"] = " ".join(str(error).split())
            logger.warning("lorafuse: C++ offload extension unavailable (%s); "
                           "offload uses the pure-PyTorch path", _extension["error"])
            return False


def extension_status() -> str:
    """One line: where the loaded extension came from, or why it is not used (without building)."""
    if _extension["path"] is not None:
        with_cuda = bool(torch.ops.lorafuse.has_cuda())
        return f"extension loaded from {_extension['path']} ({'CUDA' if with_cuda else 'CPU-only'} build)"
    if _extension["error"] is not None:
        return f"extension unavailable: {_extension['error']}"
    if _disabled_by_env():
        return "extension disabled by LORAFUSE_EXTENSION"
    return "extension not loaded yet"


# ----------------------------------------------------------------------------------------------
# The pure-PyTorch twin of the C++ arena
# ----------------------------------------------------------------------------------------------


def _error(message: str) -> RuntimeError:
    return RuntimeError("lorafuse offload: " + message)


def _mib(nbytes: int) -> str:
    return f"{nbytes} bytes ({nbytes / 2**20:.1f} MiB)"


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _Entry:
    __slots__ = ("chunk", "offset", "nbytes", "sizes", "dtype", "staged", "event")

    def __init__(self, chunk, offset, nbytes, sizes, dtype):
        self.chunk, self.offset, self.nbytes, self.sizes, self.dtype = chunk, offset, nbytes, sizes, dtype
        self.staged = None
        self.event = None

    def host_view(self) -> torch.Tensor:
        if self.nbytes == 0:
            return torch.empty(self.sizes, dtype=self.dtype)
        return self.chunk[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.sizes)


class TorchOffloadArena:
    """Pure-PyTorch twin of torch.classes.lorafuse.OffloadArena: same methods, errors and policy.

    device_index -1 is a CPU arena (plain memory, synchronous copies); otherwise CUDA device
    device_index with pinned memory and copies on a side stream. max_bytes (0: unbounded) caps the
    host memory held; min_chunk_bytes is the smallest overflow chunk of a step that outgrows the
    region.
    """

    def __init__(self, device_index: int, max_bytes: int = 0, min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES):
        for name, value in (("max_bytes", max_bytes), ("min_chunk_bytes", min_chunk_bytes)):
            if value < 0:
                raise _error(f"{name} must be >= 0, got {value}")
        if device_index >= 0 and not (torch.cuda.is_available() and device_index < torch.cuda.device_count()):
            raise _error(f"no CUDA device {device_index}")
        self._device = torch.device("cpu") if device_index < 0 else torch.device("cuda", device_index)
        self._cuda = self._device.type == "cuda"
        self._side = torch.cuda.Stream(device=self._device) if self._cuda else None
        self._max_bytes = max_bytes
        self._min_chunk_bytes = min_chunk_bytes
        self._lock = threading.Lock()
        self._chunks: list[torch.Tensor] = []  # uint8 host tensors; [0] is the region
        self._chunk_offset = 0
        self._demand = 0
        self._high_water = 0
        self._grew = False
        self._host_allocations = 0
        self._entries: list[_Entry] = []
        self._generation = 1
        self._counts = dict.fromkeys(("offloads", "fetches", "prefetch_hits", "prefetch_misses"), 0)

    # -- host memory (mirrors csrc/host_arena.cpp) --

    def _new_chunk(self, size: int) -> None:
        self._chunks.append(torch.empty(size, dtype=torch.uint8, pin_memory=self._cuda))
        self._host_allocations += 1

    def _allocate(self, nbytes: int) -> tuple[torch.Tensor | None, int]:
        if nbytes == 0:
            return None, 0
        demand = _round_up(self._demand, _ALIGN) + nbytes
        if self._max_bytes and demand > self._max_bytes:
            raise _error(f"arena overflow: this step needs {_mib(demand)}, "
                               f"the limit is {_mib(self._max_bytes)}")
        offset = _round_up(self._chunk_offset, _ALIGN)
        if not self._chunks or offset + nbytes > self._chunks[-1].numel():
            size = max(nbytes, self._min_chunk_bytes)
            held = self.capacity_bytes()
            if self._max_bytes:
                if held + nbytes > self._max_bytes:
                    raise _error(f"arena overflow: {_mib(held)} held, {_mib(nbytes)} more "
                                       f"needed, the limit is {_mib(self._max_bytes)}")
                size = min(size, self._max_bytes - held)
            self._new_chunk(size)
            self._grew = True
            offset = 0
        self._chunk_offset = offset + nbytes
        self._demand = demand
        self._high_water = max(self._high_water, demand)
        return self._chunks[-1], offset

    def capacity_bytes(self) -> int:
        return sum(chunk.numel() for chunk in self._chunks)

    def _free_all(self) -> None:
        if self._chunks:
            self._wait_side()
            self._chunks.clear()

    # -- public methods (same names and behaviour as the C++ class) --

    def offload(self, t: torch.Tensor) -> int:
        with self._lock:
            if t.device != self._device:
                raise _error(f"this arena is for {self._device}, got a tensor on {t.device}")
            if t.layout != torch.strided or not t.is_contiguous():
                raise _error(f"offload() needs a contiguous strided tensor, got sizes "
                                   f"{list(t.shape)} strides {list(t.stride())}")
            if t.is_conj() or t.is_neg():
                raise _error("resolve conjugate/negative views (resolve_conj/resolve_neg) "
                                   "before offload()")
            nbytes = t.numel() * t.element_size()
            chunk, offset = self._allocate(nbytes)
            entry = _Entry(chunk, offset, nbytes, tuple(t.shape), t.dtype)
            if nbytes:
                detached = t.detach()
                if self._cuda:
                    self._side.wait_stream(torch.cuda.current_stream(self._device))
                    with torch.cuda.stream(self._side):
                        entry.host_view().copy_(detached, non_blocking=True)
                    detached.record_stream(self._side)  # its memory is not reused before the copy read it
                else:
                    entry.host_view().copy_(detached)
            self._entries.append(entry)
            self._counts["offloads"] += 1
            return (self._generation << 32) | (len(self._entries) - 1)

    def _lookup(self, handle: int, what: str) -> _Entry:
        generation = handle >> 32
        if handle <= 0 or not 1 <= generation <= self._generation:
            raise _error(f"{what}({handle}): not a handle of this arena")
        if generation != self._generation:
            raise _error(f"{what}({handle}): handle used after reset() (it is from step "
                               f"{generation}, the arena is at step {self._generation})")
        index = handle & 0xFFFFFFFF
        if index >= len(self._entries):
            raise _error(f"{what}({handle}): not a handle of this arena")
        return self._entries[index]

    def _prefetch(self, entry: _Entry) -> None:
        if entry.staged is not None:
            return
        if not self._cuda:
            entry.staged = entry.host_view().clone()
            return
        with torch.cuda.stream(self._side):
            staged = torch.empty(entry.sizes, dtype=entry.dtype, device=self._device)
            if entry.nbytes:
                staged.copy_(entry.host_view(), non_blocking=True)
            entry.event = torch.cuda.Event()
            entry.event.record(self._side)
        entry.staged = staged

    def prefetch(self, handle: int) -> None:
        with self._lock:
            self._prefetch(self._lookup(handle, "prefetch"))

    def fetch(self, handle: int) -> torch.Tensor:
        with self._lock:
            entry = self._lookup(handle, "fetch")
            self._counts["prefetch_hits" if entry.staged is not None else "prefetch_misses"] += 1
            self._prefetch(entry)
            out, entry.staged = entry.staged, None
            self._counts["fetches"] += 1
            if self._cuda:
                compute = torch.cuda.current_stream(self._device)
                compute.wait_event(entry.event)
                out.record_stream(compute)  # allocated on the side stream, used on the compute stream
            return out

    def fetch_into(self, handle: int, out: torch.Tensor) -> None:
        with self._lock:
            entry = self._lookup(handle, "fetch_into")
            if out.device != self._device:
                raise _error(f"fetch_into() needs a tensor on {self._device}")
            if out.dtype != entry.dtype or tuple(out.shape) != entry.sizes:
                raise _error(f"fetch_into(): wrong size: the entry holds {list(entry.sizes)} "
                                   f"{entry.dtype}, out is {list(out.shape)} {out.dtype}")
            if not out.is_contiguous():
                raise _error("fetch_into() needs a contiguous out tensor")
            self._counts["fetches"] += 1
            if entry.nbytes == 0:
                return
            if not self._cuda:
                out.copy_(entry.host_view())
                return
            compute = torch.cuda.current_stream(self._device)
            self._side.wait_stream(compute)
            with torch.cuda.stream(self._side):
                out.copy_(entry.host_view(), non_blocking=True)
            compute.wait_stream(self._side)

    def read_host(self, handle: int) -> torch.Tensor:
        with self._lock:
            entry = self._lookup(handle, "read_host")
            self._wait_side()
            return entry.host_view().clone()

    def reset(self) -> None:
        with self._lock:
            exact = len(self._chunks) == 1 and self._chunks[0].numel() == self._high_water
            if self._grew and not exact:
                self._free_all()
                self._new_chunk(self._high_water)
            self._grew = False
            self._chunk_offset = 0
            self._demand = 0
            self._entries.clear()
            self._generation += 1

    def reserve(self, nbytes: int) -> None:
        with self._lock:
            if nbytes < 0:
                raise _error(f"nbytes must be >= 0, got {nbytes}")
            if self._demand:
                raise _error("reserve() needs an empty arena (call it right after reset)")
            if self._max_bytes and nbytes > self._max_bytes:
                raise _error(f"arena overflow: reserve({_mib(nbytes)}) exceeds the limit of "
                                   f"{_mib(self._max_bytes)}")
            if self._chunks and self._chunks[0].numel() >= nbytes:
                return
            self._free_all()
            if nbytes:
                self._new_chunk(nbytes)
            self._high_water = max(self._high_water, nbytes)

    def _wait_side(self) -> None:
        if self._cuda:
            self._side.synchronize()

    def synchronize(self) -> None:
        with self._lock:
            self._wait_side()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "capacity_bytes": self.capacity_bytes(),
                "used_bytes": self._demand,
                "high_water_bytes": self._high_water,
                "host_allocations": self._host_allocations,
                "pinned": int(self._cuda),
                "generation": self._generation,
                "entries": len(self._entries),
                "staged": sum(entry.staged is not None for entry in self._entries),
                **self._counts,
            }

    def side_stream(self) -> int:
        return self._side.cuda_stream if self._cuda else 0

    def device(self) -> str:
        return str(self._device)


def make_offload_arena(device: torch.device | str, *, backend: str = "auto", max_bytes: int = 0,
                       min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES):
    """An offload arena for `device`: the C++ one ("extension"), the PyTorch twin ("torch"), or the
    C++ one when it loads and else the twin ("auto"). Returns (arena, backend name)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    elif device.type == "cpu":
        index = -1
    else:
        raise ValueError(f"offload supports cpu and cuda devices, got {device}")
    if backend not in ("auto", "extension", "torch"):
        raise ValueError(f"backend must be auto, extension or torch; got {backend!r}")
    if backend != "torch":
        if load_extension():
            if index < 0 or torch.ops.lorafuse.has_cuda():
                return torch.classes.lorafuse.OffloadArena(index, max_bytes, min_chunk_bytes), "extension"
            reason = "the extension was built without CUDA"
        else:
            reason = extension_status()
        if backend == "extension":
            raise _error(f"backend='extension' requested, but {reason}")
        if _extension["path"] is not None and not _extension["warned_cpu_only"]:
            # load_extension() logged its own failure; this is the other way to end up here.
            _extension["warned_cpu_only"] = True
            logger.warning("lorafuse: %s; offload uses the pure-PyTorch path", reason)
    return TorchOffloadArena(index, max_bytes, min_chunk_bytes), "torch"


# ----------------------------------------------------------------------------------------------
# Per-layer checkpointing
# ----------------------------------------------------------------------------------------------


class _Offloaded:
    """What autograd keeps for an offloaded layer input: the arena handle, never the tensor."""

    __slots__ = ("layer", "handle", "fetched", "prefetched")

    def __init__(self, layer: int, handle: int):
        self.layer, self.handle, self.fetched, self.prefetched = layer, handle, False, False


class LayerCheckpointer:
    """Runs decoder layers under their checkpointing mode; one per training run and device.

        ckpt = LayerCheckpointer(device, modes)   # modes: one of MODES per layer
        for i, layer in enumerate(layers):
            hidden = ckpt.checkpoint(i, layer_fn, hidden, cos, sin, cu_seqlens, max_seqlen)
        loss.backward(); optimizer.step(); ckpt.end_step()

    fn(hidden, *args) must return the layer output (a tensor, or a tuple whose first item is
    it) and must not modify `hidden` in place. args are passed through torch.utils.checkpoint:
    non-tensor values and constant tensors (cu_seqlens, position ids, RoPE tables); they stay on
    the device. Under torch.no_grad() every mode is a plain call.

    backend: "auto" (C++ arena if the extension loads, else the PyTorch twin), "extension" or
    "torch". min_offload_bytes: smaller layer inputs stay on the device. max_host_bytes (0: no
    bound) caps the pinned host memory; a step needing more raises "arena overflow".
    """

    def __init__(self, device: torch.device | str, modes: Sequence[str] = (), *, backend: str = "auto",
                 min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES, max_host_bytes: int = 0):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.min_offload_bytes = int(min_offload_bytes)
        self._backend_request = backend
        self._max_host_bytes = int(max_host_bytes)
        self._arena = None
        self.backend: str | None = None  # "extension" or "torch" once an offload arena exists
        self._modes: list[str] = []
        self._pending: dict[int, list[_Offloaded]] = {}  # layer -> its offloaded inputs, oldest first
        self._unfetched = 0
        self.set_modes(modes)

    # -- configuration --

    @property
    def modes(self) -> list[str]:
        return list(self._modes)

    def set_modes(self, modes: Sequence[str]) -> None:
        """One mode per decoder layer; takes effect at the next checkpoint() call."""
        modes = list(modes)
        for index, mode in enumerate(modes):
            if mode not in MODES:
                raise ValueError(f"checkpointing mode of layer {index} must be one of {MODES}, got {mode!r}")
        if "offload" in modes and self._arena is None:
            self._arena, self.backend = make_offload_arena(self.device, backend=self._backend_request,
                                                           max_bytes=self._max_host_bytes)
        self._modes = modes

    def mode(self, layer_index: int) -> str:
        if not 0 <= layer_index < len(self._modes):
            raise IndexError(f"layer {layer_index} has no checkpointing mode ({len(self._modes)} set; "
                             "call set_modes with one mode per layer)")
        return self._modes[layer_index]

    # -- the forward side --

    def checkpoint(self, layer_index: int, fn: Callable[..., Any], hidden: torch.Tensor, *args: Any) -> Any:
        """fn(hidden, *args) for decoder layer `layer_index`, under that layer's mode."""
        mode = self.mode(layer_index)
        if mode == "none" or not torch.is_grad_enabled():
            out = fn(hidden, *args)
        elif mode == "recompute":
            out = torch.utils.checkpoint.checkpoint(fn, hidden, *args, use_reentrant=False)
        else:
            self._recycle_if_drained()
            with torch.autograd.graph.saved_tensors_hooks(*self._offload_hooks(layer_index, hidden)):
                out = torch.utils.checkpoint.checkpoint(fn, hidden, *args, use_reentrant=False)
        self._watch_backward(layer_index, out)
        return out

    def _offload_hooks(self, layer_index: int, hidden: torch.Tensor):
        # Only metadata of `hidden` is captured: a reference would keep it on the device.
        key = (hidden.data_ptr(), tuple(hidden.shape), tuple(hidden.stride()), hidden.dtype, hidden.device)
        wanted = (hidden.device == self.device and hidden.is_contiguous()
                  and hidden.numel() * hidden.element_size() >= self.min_offload_bytes)

        def pack(t: torch.Tensor):
            if not wanted or (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device) != key:
                return t
            saved = _Offloaded(layer_index, self._arena.offload(t))
            self._pending.setdefault(layer_index, []).append(saved)
            self._unfetched += 1
            return saved

        return pack, self._unpack

    def _unpack(self, saved):
        if not isinstance(saved, _Offloaded):
            return saved
        tensor = self._arena.fetch(saved.handle)
        if not saved.fetched:
            saved.fetched = True
            self._unfetched -= 1
        self._prefetch_below(saved.layer)
        return tensor

    def _watch_backward(self, layer_index: int, out: Any) -> None:
        """Prefetch the next offloaded input when this layer's output gradient is ready."""
        head = out[0] if isinstance(out, (tuple, list)) and out else out
        if not (isinstance(head, torch.Tensor) and head.requires_grad and torch.is_grad_enabled()):
            return
        waiting_below = (layer < layer_index and any(not saved.fetched for saved in entries)
                         for layer, entries in self._pending.items())
        if any(waiting_below):
            head.register_hook(functools.partial(self._on_output_grad, layer_index))

    def _on_output_grad(self, layer_index: int, grad: torch.Tensor) -> None:
        self._prefetch_below(layer_index)

    def _prefetch_below(self, layer_index: int) -> None:
        """Starts bringing back the input of the nearest offloaded layer below layer_index."""
        for layer in sorted((j for j in self._pending if j < layer_index), reverse=True):
            waiting = [s for s in self._pending[layer] if not s.fetched]
            if waiting:
                saved = waiting[-1]  # the newest forward's entry is the one backward reaches first
                if not saved.prefetched:
                    saved.prefetched = True
                    self._arena.prefetch(saved.handle)
                return

    # -- step boundaries --

    def _recycle_if_drained(self) -> None:
        """Reuses the arena from its start once every offloaded input came back (after each
        micro-batch's backward), so gradient accumulation does not multiply the host memory."""
        if self._pending and self._unfetched == 0:
            self._reset_arena()

    def _reset_arena(self) -> None:
        if self._arena is not None:
            self._arena.reset()
        self._pending.clear()
        self._unfetched = 0

    def end_step(self) -> None:
        """After the optimizer step: every offloaded input of this step is dropped, the arena is reused."""
        self._reset_arena()

    def stats(self) -> dict[str, Any]:
        """The arena's counters (empty without an offload layer) and the backend name."""
        out: dict[str, Any] = {"backend": self.backend}
        if self._arena is not None:
            out.update(dict(self._arena.stats()))
        return out

    def synchronize(self) -> None:
        """Waits for the arena's copies (tests, shutdown); training never needs it."""
        if self._arena is not None:
            self._arena.synchronize()


# ----------------------------------------------------------------------------------------------
# Memory-budget policy
# ----------------------------------------------------------------------------------------------


def layer_modes(setting: str, n_layers: int) -> list[str]:
    """Per-layer modes for one config value (train.checkpointing): "none" and "recompute" apply to
    every layer; "offload" to every layer but the last, which recomputes (its input is needed first
    in backward, so offloading it would only add a copy and a wait)."""
    if setting not in MODES:
        raise ValueError(f"checkpointing must be one of {MODES}, got {setting!r}")
    if setting == "offload":
        return ["offload"] * (n_layers - 1) + ["recompute"] * min(n_layers, 1)
    return [setting] * n_layers


def estimate_peak_bytes(modes: Sequence[str], bytes_per_token_per_layer_kept: float,
                        bytes_per_token_layer_input: float, tokens: int) -> float:
    """Peak activation bytes of one forward+backward under `modes` (the module docstring's model)."""
    kept = bytes_per_token_per_layer_kept * tokens
    layer_input = bytes_per_token_layer_input * tokens
    resident = {"none": kept, "recompute": layer_input, "offload": 0.0}
    below = 0.0  # what the layers below j keep
    offloaded_below = False
    peak = 0.0
    for mode in modes:
        own = kept if mode == "none" else layer_input + kept
        peak = max(peak, below + own + (layer_input if offloaded_below else 0.0))
        below += resident[mode]
        offloaded_below = offloaded_below or mode == "offload"
    return peak


def plan_checkpointing(n_layers: int, bytes_per_token_per_layer_kept: float,
                       bytes_per_token_layer_input: float, tokens: int, budget_bytes: float, *,
                       min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES) -> list[str]:
    """A mode per layer ("none" = keep, "recompute", "offload") whose peak fits budget_bytes.

    budget_bytes is what activations may use: the caller subtracts weights, LoRA and optimizer
    state, and the loss workspace from the device memory it allows. Layout: offloaded layers at
    the bottom, recomputed ones in the middle, kept ones at the top (see the module docstring).
    The plan keeps as many layers as fit, then recomputes as many as fit, then offloads the rest;
    the last layer is never offloaded (its input is needed first in backward), nor is an input
    under min_offload_bytes. When nothing fits it returns the plan with the smallest peak and logs
    a warning with that peak.
    """
    kept_bytes, input_bytes = bytes_per_token_per_layer_kept, bytes_per_token_layer_input
    if n_layers <= 0:
        return []
    if tokens <= 0:
        return ["none"] * n_layers
    may_offload = bytes_per_token_layer_input * tokens >= min_offload_bytes
    best: tuple[float, list[str]] | None = None
    for n_keep in range(n_layers, -1, -1):
        max_offload = min(n_layers - n_keep, n_layers - 1) if may_offload else 0
        for n_offload in range(max_offload + 1):
            n_recompute = n_layers - n_keep - n_offload
            modes = ["offload"] * n_offload + ["recompute"] * n_recompute + ["none"] * n_keep
            peak = estimate_peak_bytes(modes, kept_bytes, input_bytes, tokens)
            if peak <= budget_bytes:
                return modes
            if best is None or peak < best[0]:
                best = (peak, modes)
    assert best is not None
    logger.warning("lorafuse: activations need at least %.2f GiB at %d tokens, more than the budget of "
                   "%.2f GiB; using the plan with the smallest peak",
                   best[0] / 2**30, tokens, budget_bytes / 2**30)
    return best[1]


def llama_layer_bytes_per_token(hidden_size: int, intermediate_size: int, num_heads: int,
                                num_kv_heads: int | None = None, *, head_dim: int | None = None,
                                dtype: torch.dtype = torch.bfloat16, lora_rank: int = 16,
                                lora_projections: int = 7) -> int:
    """Bytes per token that one kept Llama-family decoder layer saves for backward with lorafuse's
    fused kernels (RMSNorm, RoPE, varlen attention, SwiGLU, LoRA linears with dropout 0).

    Saved, in `dtype` per token: the layer input and the post-attention residual (RMSNorm inputs),
    both normalised activations (inputs of q/k/v and of gate/up), q and k after RoPE, v, the
    attention output (o_proj input), gate, up and their SwiGLU product (down_proj input), and x @ A^T
    (lora_rank values) of each LoRA projection; in float32: two RMSNorm rstd and the attention
    log-sum-exp per query head. For anything else (HF stock layers, other kernels) measure instead:
    measure_bytes_per_token. The layer input alone is hidden_size * dtype's itemsize.
    """
    num_kv_heads = num_kv_heads or num_heads
    head_dim = head_dim or hidden_size // num_heads
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    elements = (4 * hidden_size + 2 * q_width + 2 * kv_width + 3 * intermediate_size
                + lora_rank * lora_projections)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return elements * itemsize + 4 * (2 + num_heads)


def measure_bytes_per_token(fn: Callable[..., Any], make_inputs: Callable[[int], Sequence[Any]],
                            tokens: tuple[int, int] = (64, 128)) -> float:
    """Bytes per token that fn saves for backward, measured: make_inputs(n) gives (hidden, *args)
    for n tokens; fn runs at both token counts, the distinct storages its autograd graph saves are
    summed, and the difference per token is returned (weights and constants cancel out)."""
    totals = []
    for n in tokens:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages=storages):
            storage = t.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        hidden, *args = make_inputs(n)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(hidden, *args)
        del out
        totals.append(sum(storages.values()))
    return (totals[1] - totals[0]) / (tokens[1] - tokens[0])
