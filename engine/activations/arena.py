"""Pinned host memory for offloaded activations: the pure-PyTorch arena, the choice of arena, and
how much host memory one may take.

The C++ arena (csrc/offload_arena.cpp, torch.classes.lorafuse.OffloadArena, built by
engine/extension.py) is one pinned host region, exact-size bump allocation, reset every step and
regrown only when a step needs more than any before; copies run on a side stream ordered by CUDA
events, and nothing waits on the host. TorchOffloadArena is its pure-PyTorch twin (same methods,
errors and policy), used when the extension cannot be built; it gets pinned memory from torch's
caching host allocator, which rounds each request up to a power of two, the cost the C++ arena
avoids.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from .. import extension

# Pinned host memory an offload arena takes at most by default: half of what is free, so the page cache,
# the data loader and a VM's host side keep room (a pinned page cannot be swapped or reclaimed).
HOST_SHARE = 0.5
DEFAULT_MIN_CHUNK_BYTES = 64 << 20  # overflow chunks of the first step: few host allocations
_ALIGN = 256  # block starts in the arena (the C++ arena uses the same)


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo, else the physical memory."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_host_limit() -> int:
    return int(HOST_SHARE * available_host_bytes())


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
        loaded = extension.load_extension()
        if loaded and (index < 0 or extension.has_cuda()):
            return torch.classes.lorafuse.OffloadArena(index, max_bytes, min_chunk_bytes), "extension"
        reason = "the extension was built without CUDA" if loaded else extension.extension_status()
        if backend == "extension":
            raise _error(f"backend='extension' requested, but {reason}")
        if loaded:  # load_extension() logged its own failure; this is the other way to end up here
            extension.warn_built_without_cuda()
    return TorchOffloadArena(index, max_bytes, min_chunk_bytes), "torch"
