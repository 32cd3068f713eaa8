"""The kernel launches of one training step at a model's real shapes, recorded on meta tensors (no GPU).

The public kernel functions run exactly as on a GPU (their host code: buffers, views, strides, tile
schedules, flags), but on `meta` tensors, and every Triton launch is recorded instead of run: the kernel,
its arguments and keywords, and for an autotuned kernel the autotuner (whose configs aot.py then compiles
one by one). Compiling such a record with the launcher's own specialisation (aot.compile_launch) gives what a
real launch would compile: integers divisible by 16 and unit strides specialised, pointers aligned where the
tensor's offset is.

The step is one decoder layer, forward and backward, plus the loss head, as engine/forward.py runs them
(the Triton LoRA GEMM path; the LoRA masters float32, read in place, a group's A and B each one buffer as
inject_lora leaves them, so q/k/v and gate/up take the rank map):
  x, h = rms_norm_branch(h); q, k, v = lora_linear_group(x, [Wq; Wk; Wv]); q, k, v = apply_rope(q, k, v=v)
  a = varlen_attention(q, k, v)   (k, v computed again in its backward: x again, lora_linear_group(x, [Wk; Wv]),
                                   rope_values(k))
  x, h = rms_norm_residual(lora_linear(a, Wo), h)
  h = lora_mlp(x, [Wg; Wu], Wd, residual=h);  loss = fused_linear_cross_entropy(rms_norm(h), Whead)
  (the projections of a norm's output handed its input, normed_from, as the engine does)
plus the Triton producers of the cuBLAS LoRA path (lora_cublas.py), forward and backward, at the shapes of
engine/lora_gemm.py's decoder layer: rms_norm_lowrank ([x_hat | U] for q/k/v and for gate/up) and glu_lowrank
([h | U] for down_proj); its GEMMs are cuBLAS calls, which compile nothing here.
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
# head dim 64 (Llama-3.2-1B, SmolLM2): only its attention launches are compiled (ATTENTION_ONLY), the rest are
# the kernels above at smaller widths
LLAMA_32_1B = Shape("Llama-3.2-1B", 2048, 32, 8, 64, 8192, 128256)
ATTENTION_ONLY = "_varlen"

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
    from ._lora_gemm_select import forced_path

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
               ("lora_linear", "varlen_attention", "rope", "rms_norm", "swiglu", "fused_linear_cross_entropy", "nf4",
                "rms_norm_lora", "swiglu_lora")]
    saved = [(m, m.use_triton) for m in modules if hasattr(m, "use_triton")]
    # the producers pick their tiles by INTERPRETED, imported by value: a GPU run's tiles, not the interpreter's
    saved_modinterp = [(m, m.INTERPRETED) for m in modules if hasattr(m, "INTERPRETED")]
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
        for m, _ in saved_modinterp:
            m.INTERPRETED = False
        with forced_path("triton"):  # the Triton LoRA GEMMs, whatever LORAFUSE_LORA_GEMM says
            yield launches
    finally:
        for m, value in saved_modinterp:
            m.INTERPRETED = value
        for m, fn in saved:
            m.use_triton = fn
        JITFunction.run, Autotuner.run = saved_run
        _launch.INTERPRETED, _launch.ASSUMED_ARCH = saved_interp, saved_arch
        torch.is_autocast_enabled = autocast_enabled


def _cu_seqlens(tokens: int, docs: int) -> torch.Tensor:
    return torch.empty(docs + 1, dtype=torch.int32, device="meta")


def training_step(shape: Shape = LLAMA_31_8B, arch: int = 90, tokens: int = TOKENS, rank: int = RANK,
                  alpha: float = ALPHA, dtype=torch.bfloat16) -> list[Launch]:
    """The launches on sm_<arch> of one decoder layer (forward and backward) and the loss head, then the cuBLAS
    LoRA path's Triton producers (module docstring), on meta tensors."""
    from lorafuse import kernels
    from lorafuse.kernels.rms_norm import NormedInput
    from lorafuse.kernels.rope import rope_values
    from lorafuse.kernels.varlen_attention import KVAgain

    dev = "meta"

    def w(*size, grad=False):
        return torch.empty(*size, dtype=dtype, device=dev).requires_grad_(grad)

    def adapters(n_outs, n_in):
        """float32 masters (A_i, B_i) of projections stacked as inject_lora stacks a layer's group: every A_i a
        row block of one [sum r, in] buffer, every B_i a row block of one [sum n_i, r] buffer."""
        a_all = torch.empty(rank * len(n_outs), n_in, dtype=torch.float32, device=dev).requires_grad_()
        b_all = torch.empty(sum(n_outs), rank, dtype=torch.float32, device=dev).requires_grad_()
        return list(zip(a_all.split(rank, 0), b_all.split(list(n_outs), 0), strict=True))

    s = alpha / rank
    hq, hkv, d, hid, inter = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.head_dim, \
        shape.hidden, shape.intermediate
    with recording(arch) as launches:
        h = w(tokens, hid, grad=True)
        norm_w = w(hid)
        x, h = kernels.rms_norm_branch(h, norm_w, 1e-5)
        (qa, qb), (ka, kb), (va, vb) = adapters((hq, hkv, hkv), hid)
        w_qkv, normed = w(hq + 2 * hkv, hid), NormedInput(h, norm_w, 1e-5, 0.0, {})
        q, k, v = kernels.lora_linear_group(x, w_qkv, [qa, ka, va], [qb, kb, vb], [s] * 3, [hq, hkv, hkv],
                                            normed_from=normed)
        q, k, v = q.view(tokens, shape.heads, d), k.view(tokens, shape.kv_heads, d), v.view(tokens, shape.kv_heads, d)
        positions = torch.empty(tokens, dtype=torch.int64, device=dev)
        inv_freq = torch.empty(d // 2, dtype=torch.float32, device=dev)
        q, k, v = kernels.apply_rope(q, k, positions, inv_freq, v=v)

        def kv_again(h, positions):  # engine/forward.py's keys_and_values_again
            k, v = kernels.lora_linear_group(normed.values(h, keep=True), w_qkv[hq:], [ka, va], [kb, vb], [s] * 2,
                                             [hkv, hkv])
            heads = (tokens, shape.kv_heads, d)
            return rope_values(k.view(heads), positions, inv_freq), v.view(heads)

        att = kernels.varlen_attention(q, k, v, _cu_seqlens(tokens, DOCS), 8192, softmax_scale=d ** -0.5,
                                       window=shape.window, softcap=shape.softcap,
                                       kv_again=KVAgain(kv_again, (h, positions)))
        ((oa, ob),) = adapters((hid,), hq)
        o = kernels.lora_linear(att.reshape(tokens, hq), w(hid, hq), oa, ob, s)
        x, h = kernels.rms_norm_residual(o, h, norm_w, 1e-5)
        (ga, gb), (ua, ub) = adapters((inter, inter), hid)
        ((da, db),) = adapters((hid,), inter)
        h = kernels.lora_mlp(x, w(2 * inter, hid), ga, gb, s, ua, ub, s, w(hid, inter), da, db, s,
                             activation=shape.activation, normed_from=NormedInput(h, norm_w, 1e-5), residual=h)
        labels = torch.empty(tokens, dtype=torch.int64, device=dev)
        loss = kernels.fused_linear_cross_entropy(kernels.rms_norm(h, norm_w, 1e-5), w(shape.vocab, hid), labels,
                                                  reduction="sum", softcap=shape.final_softcap)
        loss.backward()
        _cublas_producers(shape, tokens, rank, s, dtype)
    return launches


def _cublas_producers(shape: Shape, tokens: int, rank: int, s: float, dtype) -> None:
    """The Triton launches of the cuBLAS LoRA path (engine/lora_gemm.py's decoder layer), forward and backward:
    the RMSNorms in front of q/k/v and gate/up write [x_hat | U] (rms_norm_lowrank), the GLU writes [h | U]
    for down_proj (glu_lowrank). Their gradients come as the two column blocks of one buffer, [dX_base | V]
    of the GEMM dY [W | B], as there."""
    from .rms_norm_lora import rms_norm_lowrank
    from .swiglu_lora import glu_lowrank

    dev, hid, inter = "meta", shape.hidden, shape.intermediate
    norm_w = torch.empty(hid, dtype=dtype, device=dev)
    for R in (3 * rank, 2 * rank):  # q/k/v, gate/up: the group's A_i stacked, float32
        a_all = torch.empty(R, hid, dtype=torch.float32, device=dev).requires_grad_()
        x = torch.empty(tokens, hid, dtype=dtype, device=dev).requires_grad_()
        y, u = rms_norm_lowrank(x, norm_w, 1e-5, 0.0, a_all, torch.full((R,), s, dtype=torch.float32, device=dev))
        grads = torch.empty(tokens, hid + R, dtype=dtype, device=dev)
        torch.autograd.backward([y, u], [grads[:, :hid], grads[:, hid:]])
    gu = torch.empty(tokens, 2 * inter, dtype=dtype, device=dev).requires_grad_()
    da = torch.empty(rank, inter, dtype=torch.float32, device=dev).requires_grad_()
    hh, ud = glu_lowrank(gu[:, :inter], gu[:, inter:], da, s, shape.activation)
    grads = torch.empty(tokens, inter + rank, dtype=dtype, device=dev)
    torch.autograd.backward([hh, ud], [grads[:, :inter], grads[:, inter:]])
