"""The offload arena: the C++ extension (torch.classes.lorafuse.OffloadArena) and its pure-PyTorch
twin (TorchOffloadArena) run the same cases; both must behave identically.

CPU: round trips of many dtypes and shapes, exact-size bump allocation, reuse across steps
without growth, errors (wrong sizes, use after reset, overflow) as Python exceptions. GPU
(marked): copies overlap compute, timed with CUDA events.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from lorafuse.engine.activations import TorchOffloadArena

ALIGN = 256
BACKENDS = ["extension", "torch"]


def make_arena(backend, request, device_index=-1, max_bytes=0, min_chunk_bytes=0):
    if backend == "extension":
        request.getfixturevalue("extension")
        return torch.classes.lorafuse.OffloadArena(device_index, max_bytes, min_chunk_bytes)
    return TorchOffloadArena(device_index, max_bytes, min_chunk_bytes)


def demand(sizes_in_bytes):
    """Bytes one step needs in a single region: exact sizes, starts aligned to 256."""
    total = 0
    for nbytes in sizes_in_bytes:
        if nbytes:
            total = math.ceil(total / ALIGN) * ALIGN + nbytes
    return total


# ---------------------------------------------------------------------------------------------
# Behaviour on CPU, both backends
# ---------------------------------------------------------------------------------------------


def sample_tensors():
    return [
        torch.randn(13, 7),
        torch.randn(1),
        torch.randn(3, 0, 5),  # no bytes
        torch.randn(5, 11).to(torch.bfloat16),
        torch.randint(-(2**40), 2**40, (9,), dtype=torch.int64),
        torch.rand(17) > 0.5,
        torch.randn(2, 3, 4, dtype=torch.float64),
        torch.randn(33, 3).to(torch.float16),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_every_dtype_and_shape(backend, request):
    arena = make_arena(backend, request)
    tensors = sample_tensors()
    originals = [t.clone() for t in tensors]
    handles = [arena.offload(t) for t in tensors]
    for t in tensors:
        t.zero_()  # the arena holds its own copy
    for index, (handle, original) in enumerate(zip(handles, originals, strict=True)):
        if index % 2:
            arena.prefetch(handle)
        fetched = arena.fetch(handle)
        assert fetched.dtype == original.dtype and fetched.shape == original.shape
        assert torch.equal(fetched, original)
        assert torch.equal(arena.read_host(handle), original)
        again = torch.zeros_like(original)
        arena.fetch_into(handle, again)
        assert torch.equal(again, original)
        assert torch.equal(arena.fetch(handle), original)  # fetch twice (a retained graph) works
    stats = dict(arena.stats())
    assert stats["offloads"] == len(tensors) and stats["entries"] == len(tensors)
    assert stats["prefetch_hits"] == len(tensors) // 2
    assert stats["prefetch_misses"] == len(tensors) - len(tensors) // 2 + len(tensors)  # + the second fetches
    assert stats["used_bytes"] == demand([t.numel() * t.element_size() for t in tensors])
    assert stats["pinned"] == 0 and arena.side_stream() == 0 and arena.device() == "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_size_region_reused_across_steps(backend, request):
    arena = make_arena(backend, request)
    shapes = [(37, 19), (5,), (64, 3), (1, 1)]
    step_bytes = demand([math.prod(s) * 4 for s in shapes])
    history = []
    for step in range(4):
        handles = [arena.offload(torch.randn(*s)) for s in shapes]
        for handle in reversed(handles):
            arena.fetch(handle)
        stats = dict(arena.stats())
        assert stats["used_bytes"] == step_bytes and stats["high_water_bytes"] == step_bytes
        arena.reset()
        stats = dict(arena.stats())
        history.append((stats["capacity_bytes"], stats["host_allocations"]))
        assert stats["entries"] == 0 and stats["generation"] == step + 2
    # The first step grew chunk by chunk (min_chunk_bytes=0: exact-size chunks), its reset folded
    # them into one region of exactly the step's bytes (no power-of-two rounding); later steps
    # allocate nothing.
    assert history[0][0] == step_bytes
    assert history[0][1] == len(shapes) + 1
    assert all(entry == history[0] for entry in history)


@pytest.mark.parametrize("backend", BACKENDS)
def test_growth_is_rare_and_reserve_presizes(backend, request):
    arena = make_arena(backend, request, min_chunk_bytes=1 << 20)
    small = [arena.offload(torch.randn(100)) for _ in range(50)]  # 50 blocks, one 1 MiB chunk
    assert dict(arena.stats())["host_allocations"] == 1
    arena.fetch(small[0])
    arena.reset()
    assert dict(arena.stats())["capacity_bytes"] == demand([400] * 50)  # refitted to the exact demand
    assert dict(arena.stats())["host_allocations"] == 2
    arena.offload(torch.randn(1000, 1000))  # a bigger step: overflow once, refit once
    arena.reset()
    big = demand([4_000_000])
    assert dict(arena.stats())["capacity_bytes"] == big
    for _ in range(3):
        arena.offload(torch.randn(1000, 1000))
        arena.reset()
    assert dict(arena.stats())["host_allocations"] == 4
    arena.reserve(big // 2)  # smaller than the region: nothing happens
    arena.reserve(2 * big)
    arena.offload(torch.randn(2, 1000, 1000))
    arena.reset()
    stats = dict(arena.stats())
    assert stats["host_allocations"] == 5 and stats["capacity_bytes"] == 2 * big


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_are_exceptions_and_leave_the_arena_usable(backend, request):
    arena = make_arena(backend, request, max_bytes=10_000)
    handle = arena.offload(torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="wrong size"):
        arena.fetch_into(handle, torch.empty(5, 4))
    with pytest.raises(RuntimeError, match="wrong size"):
        arena.fetch_into(handle, torch.empty(4, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        arena.offload(torch.randn(8, 6).t())
    with pytest.raises(RuntimeError, match="arena is for cpu"):
        arena.offload(torch.empty(3, device="meta"))
    with pytest.raises(RuntimeError, match="arena overflow"):
        arena.offload(torch.randn(3000))  # 12 000 bytes > 10 000
    with pytest.raises(RuntimeError, match="not a handle"):
        arena.fetch(handle + 7)
    with pytest.raises(RuntimeError, match="not a handle"):
        arena.prefetch(-1)
    with pytest.raises(RuntimeError, match="reserve"):
        arena.reserve(100)  # not between steps
    fine = arena.offload(torch.arange(6.0))  # the failed calls left nothing behind
    assert torch.equal(arena.fetch(fine), torch.arange(6.0))
    arena.reset()
    for call in (lambda: arena.fetch(handle), lambda: arena.prefetch(fine), lambda: arena.read_host(fine),
                 lambda: arena.fetch_into(fine, torch.empty(6))):
        with pytest.raises(RuntimeError, match="used after reset"):
            call()
    assert torch.equal(arena.fetch(arena.offload(torch.ones(3))), torch.ones(3))
    with pytest.raises(RuntimeError, match="max_bytes must be >= 0"):
        make_arena(backend, request, max_bytes=-1)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            make_arena(backend, request, device_index=0)


def test_backends_report_the_same_numbers(request):
    """The same calls give the same stats on the C++ arena and its PyTorch twin."""
    arenas = [make_arena(backend, request, min_chunk_bytes=4096) for backend in BACKENDS]
    trace = [[] for _ in arenas]
    for step in range(3):
        shapes = [(31, 3), (700,), (2, 2)] * (step + 1)
        tensors = [torch.randn(*s) for s in shapes]
        for arena, log in zip(arenas, trace, strict=True):
            handles = [arena.offload(t) for t in tensors]
            arena.prefetch(handles[-1])
            for h in reversed(handles):
                arena.fetch(h)
            log.append(dict(arena.stats()))
            arena.reset()
            log.append(dict(arena.stats()))
    assert trace[0] == trace[1]


# ---------------------------------------------------------------------------------------------
# GPU: copies overlap compute (CUDA events, no host synchronisation in between)
# ---------------------------------------------------------------------------------------------


def _elapsed_ms(start, end):
    return start.elapsed_time(end)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_copies_overlap_compute(backend, request):
    device = torch.device("cuda", torch.cuda.current_device())
    arena = make_arena(backend, request, device_index=device.index, min_chunk_bytes=0)
    side = torch.cuda.ExternalStream(arena.side_stream(), device=device)
    compute = torch.cuda.current_stream(device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    payload = [torch.randn(128 << 20, device=device, dtype=torch.bfloat16) for _ in range(4)]  # 1 GiB

    def events():
        return [torch.cuda.Event(enable_timing=True) for _ in range(3)]

    def run(n_matmuls, copy):
        """Queues copies (side stream) and matmuls (compute stream) together; times both with events."""
        start, compute_end, copy_end = events()
        start.record(compute)
        issued = time.perf_counter()
        handles = copy()
        issue_ms = (time.perf_counter() - issued) * 1e3
        for _ in range(n_matmuls):
            torch.mm(a, b)
        compute_end.record(compute)
        copy_end.record(side)
        torch.cuda.synchronize(device)
        return handles, issue_ms, _elapsed_ms(start, compute_end), _elapsed_ms(start, copy_end)

    def offload_all():
        return [arena.offload(p) for p in payload]

    def device_to_host():
        return offload_all

    def host_to_device():
        handles = offload_all()
        torch.cuda.synchronize(device)
        return lambda: [arena.prefetch(h) for h in handles]

    # Warm up: cuBLAS, the arena's first-step growth, the side stream's pool of device blocks.
    handles = run(2, offload_all)[0]
    run(0, lambda: [arena.prefetch(h) for h in handles])
    arena.reset()
    one_matmul_ms = run(1, lambda: None)[2]
    for label, copy_factory in (("device to host", device_to_host), ("host to device", host_to_device)):
        copy_ms = run(0, copy_factory())[3]
        arena.reset()
        n_matmuls = max(1, round(copy_ms / one_matmul_ms))
        compute_ms = run(n_matmuls, lambda: None)[2]
        _, issue_ms, both_compute_ms, both_copy_ms = run(n_matmuls, copy_factory())
        arena.reset()
        both_ms = max(both_compute_ms, both_copy_ms)
        assert both_ms < 0.8 * (compute_ms + copy_ms), (label, both_ms, compute_ms, copy_ms)
        assert issue_ms < 0.5 * copy_ms, (label, issue_ms, copy_ms)  # the host did not wait for the copies
    stats = dict(arena.stats())
    assert stats["pinned"] == 1 and stats["host_allocations"] <= len(payload) + 1
