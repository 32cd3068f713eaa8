"""The kernel launches of one training step at a model's real shapes, recorded on meta tensors (no GPU).

The public kernel functions run exactly as on a GPU (their host code: buffers, views, strides, tile
schedules, flags), but on `meta` tensors, and every Triton launch is recorded instead of run: the kernel,
its arguments and keywords, and for an autotuned kernel the autotuner (whose configs aot.py then compiles
one by one). Compiling such a record with the launcher's own specialisation (aot.compile_launch) gives what a
real launch would compile: integers divisible by 16 and unit strides specialised, pointers aligned where the
tensor's offset is.

The step is one decoder layer, forward and backward, plus the loss head, as engine/forward.py runs them:
  x = rms_norm(h); q, k, v = lora_linear_group(x, [Wq; Wk; Wv]); q, k = apply_rope(q, k)
  a = varlen_attention(q, k, v); h = h + lora_linear(a, Wo)
  x = rms_norm(h); h = h + lora_mlp(x, [Wg; Wu], Wd);  loss = fused_linear_cross_entropy(rms_norm(h), Whead)
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Shape:
    """A model's numbers that decide the kernels' shapes (HF config names)."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    activation: str = "silu"
    window: int | None = None
    softcap: float | None = None
    final_softcap: float | None = None


LLAMA_31_8B = Shape("Llama-3.1-8B", 4096, 32, 8, 128, 14336, 128256)
# Gemma 2 9B's local layers: head dim 256, sliding window, attention softcap, GeGLU (the other shipped paths)
GEMMA_2_9B = Shape("Gemma-2-9B (local layer)", 3584, 16, 8, 256, 14336, 256000, activation="gelu_tanh",
                   window=4096, softcap=50.0, final_softcap=30.0)

TOKENS = 16384  # tokens per micro-batch of the headline run
RANK, ALPHA = 16, 32
# documents in the micro-batch: only their count reaches a kernel (n_docs); 23 is not a multiple of 16, as
# most real counts are not, so it is not specialised
DOCS = 23


@dataclass
class Launch:
    """One recorded launch: the @triton.jit function, its arguments, and the autotuner that chose (None: a
    direct launch, whose keywords already hold every constexpr and num_warps / num_stages)."""

    fn: object
    args: tuple
    kwargs: dict
    tuner: object = None
    heuristics: dict = field(default_factory=dict)


@contextlib.contextmanager
def recording(arch: int):
    """Within: kernels/* take the Triton path on meta tensors for an sm_<arch> GPU (host code that picks tiles
    by architecture sees that one) and every launch is appended to the list."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    from . import _launch

    launches: list[Launch] = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    def tuner_run(self, *args, **kwargs):
        fn, heuristics = self.fn, {}
        while isinstance(fn, (Autotuner, Heuristics)):
            if isinstance(fn, Heuristics):
                heuristics.update(fn.values)
            fn = fn.fn
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        launches.append(Launch(fn, args, kwargs, tuner=self, heuristics=heuristics))

    modules = [importlib.import_module(f"lorafuse.kernels.{m}") for m in
               ("lora_linear", "varlen_attention", "rope", "rms_norm", "swiglu", "fused_linear_cross_entropy", "nf4")]
    saved = [(m, m.use_triton) for m in modules if hasattr(m, "use_triton")]
    saved_run = (JITFunction.run, Autotuner.run)
    saved_interp, saved_arch = _launch.INTERPRETED, _launch.ASSUMED_ARCH
    autocast_enabled = torch.is_autocast_enabled

    def no_meta_autocast(device_type=None):  # autocast knows no meta device; a GPU run has autocast off here
        return False if device_type == "meta" else autocast_enabled(*([] if device_type is None else [device_type]))

    try:
        torch.is_autocast_enabled = no_meta_autocast
        for m, _ in saved:
            m.use_triton = lambda x: True
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        _launch.INTERPRETED, _launch.ASSUMED_ARCH = False, arch
        yield launches
    finally:
        for m, fn in saved:
            m.use_triton = fn
        JITFunction.run, Autotuner.run = saved_run
        _launch.INTERPRETED, _launch.ASSUMED_ARCH = saved_interp, saved_arch
        torch.is_autocast_enabled = autocast_enabled


def _cu_seqlens(tokens: int, docs: int) -> torch.Tensor:
    return torch.empty(docs + 1, dtype=torch.int32, device="meta")


def training_step(shape: Shape = LLAMA_31_8B, arch: int = 90, tokens: int = TOKENS, rank: int = RANK,
                  alpha: float = ALPHA, dtype=torch.bfloat16) -> list[Launch]:
    """The launches on sm_<arch> of one decoder layer (forward and backward) and the loss head, on meta tensors."""
    from lorafuse import kernels

    dev = "meta"

    def w(*size, grad=False):
        return torch.empty(*size, dtype=dtype, device=dev).requires_grad_(grad)

    def adapter(n_out, n_in):
        return w(rank, n_in, grad=True), w(n_out, rank, grad=True)

    s = alpha / rank
    hq, hkv, d, hid, inter = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.head_dim, \
        shape.hidden, shape.intermediate
    with recording(arch) as launches:
        h = w(tokens, hid, grad=True)
        norm_w = w(hid)
        x = kernels.rms_norm(h, norm_w, 1e-5)
        (qa, qb), (ka, kb), (va, vb) = adapter(hq, hid), adapter(hkv, hid), adapter(hkv, hid)
        q, k, v = kernels.lora_linear_group(x, w(hq + 2 * hkv, hid), [qa, ka, va], [qb, kb, vb], [s] * 3,
                                            [hq, hkv, hkv])
        q, k, v = q.view(tokens, shape.heads, d), k.view(tokens, shape.kv_heads, d), v.view(tokens, shape.kv_heads, d)
        positions = torch.empty(tokens, dtype=torch.int64, device=dev)
        inv_freq = torch.empty(d // 2, dtype=torch.float32, device=dev)
        q, k = kernels.apply_rope(q, k, positions, inv_freq)
        att = kernels.varlen_attention(q, k, v, _cu_seqlens(tokens, DOCS), 8192, softmax_scale=d ** -0.5,
                                       window=shape.window, softcap=shape.softcap)
        oa, ob = adapter(hid, hq)
        h = h + kernels.lora_linear(att.reshape(tokens, hq), w(hid, hq), oa, ob, s)
        x = kernels.rms_norm(h, norm_w, 1e-5)
        (ga, gb), (ua, ub), (da, db) = adapter(inter, hid), adapter(inter, hid), adapter(hid, inter)
        h = h + kernels.lora_mlp(x, w(2 * inter, hid), ga, gb, s, ua, ub, s, w(hid, inter), da, db, s,
                                 activation=shape.activation)
        labels = torch.empty(tokens, dtype=torch.int64, device=dev)
        loss = kernels.fused_linear_cross_entropy(kernels.rms_norm(h, norm_w, 1e-5), w(shape.vocab, hid), labels,
                                                  reduction="sum", softcap=shape.final_softcap)
        loss.backward()
    return launches
