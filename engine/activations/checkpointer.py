"""Per-decoder-layer activation checkpointing, with offload of the kept layer input to host memory.

Modes, per decoder layer (`LayerCheckpointer.set_modes`):
  "none"       plain call: every activation the layer saves for backward stays on the device.
  "recompute"  torch.utils.checkpoint (non-reentrant): only the layer input (and the constant
               tensor arguments) stay on the device; backward reruns the layer first.
  "offload"    recompute, and the layer input itself goes to a pinned host arena (arena.py) while
               forward goes on; it comes back before that layer's backward, prefetched one layer ahead.

How offload works. The checkpoint's saved inputs pass through torch.autograd.graph
.saved_tensors_hooks: the pack hook sends the layer input (only that tensor, only when it is at
least `min_offload_bytes`, contiguous, on the arena's device) to the arena and keeps a handle;
everything else is kept as is. In backward, when layer i's output gradient is ready (a tensor hook
on the output), the nearest offloaded layer below i is prefetched; the unpack hook of layer i
fetches its own input (already on its way) and prefetches the next one. So at most two
offloaded inputs are on the device at a time: the one in use and the one arriving.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils.checkpoint

from .arena import make_offload_arena

MODES = ("none", "recompute", "offload")
DEFAULT_MIN_OFFLOAD_BYTES = 1 << 20  # a smaller layer input is not worth a copy and a buffer


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
