"""NF4: frozen weights in 4 bits, bitsandbytes' format (QLoRA), and their dequantization.

A weight W [out, in] is read as one flat row-major sequence w_e, e = 0 .. n-1, cut into blocks of
BLOCKSIZE = 64 consecutive values (a block may span rows; the last one may be short). Per block b:

  absmax_b = max_e |w_e|                               (over the block's values: a short tail block
                                                         has the absmax of what it holds)
  q_e      = nearest NF4 code to w_e * (1 / absmax_b)   (reciprocal, then multiply: as bitsandbytes'
                                                         CUDA kernel; ties go to the lower code)
  w_e     ~= NF4[q_e] * absmax_b

NF4 is the 16-value codebook of the QLoRA paper (quantiles of a standard normal, scaled to [-1, 1],
with an exact 0 at index 7). Two codes share a byte: the first (even e) in the high nibble, the next
in the low one; an odd n pads the last low nibble with the code of 0.0 (7). A block of zeros stores
code 7 everywhere (bitsandbytes' CPU backend does the same; its CUDA kernel writes 0 there, whose
dequantized value is -1 times the block's rebuilt absmax, near zero but not zero): it dequantizes to
exact zeros.

Double quantization of the absmax values (bitsandbytes' compress_statistics=True): with
c = mean_b absmax_b (float32), the centred a_b = absmax_b - c are quantized blockwise in groups of
NESTED_BLOCKSIZE = 256 to 8 bits with the signed dynamic map (DYNAMIC: bitsandbytes'
create_dynamic_map(signed=True), 7 exponent bits):

  absmax2_g = max_b |a_b|,  p_b = nearest DYNAMIC code to a_b * (1 / absmax2_g)
  absmax_b ~= DYNAMIC[p_b] * absmax2_g + c       (one float32 multiply, then one add)

Stored, as bitsandbytes stores it: the packed codes (uint8, ceil(n/2)), p (uint8 per block), absmax2
(float32 per group), c, the two codebooks, the shape and the dtype. Dequantized values are computed in
float32 exactly as above (no fused multiply-add, so they are bit for bit bitsandbytes') and cast to the
output dtype. Several weights of one input (q/k/v) are one NF4Weight when each but the last holds a
multiple of 64 x 256 values: their blocks and groups then line up, and c is kept per group.

Tiling of the dequantize kernel: one program per BLOCK_BYTES packed bytes (2 x BLOCK_BYTES outputs);
both nibbles of a byte belong to one block, so the block index is byte // (BLOCKSIZE / 2); the two
values of each byte are joined and stored as one contiguous run. Memory-bound: 0.5 bytes read and
2 (bf16) written per value, plus a gather of each block's absmax that stays in L1.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._dispatch import HAVE_TRITON, use_triton
from ._launch import aot_spec, count, empty_output, launch

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

# The NF4 codebook (QLoRA, bitsandbytes' get_4bit_type("nf4")): float32 values, index = the 4-bit code.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7)):
    for exponent i = 0 .. 6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1) (float32) times 10^(i - 6), with
    both signs; then 0 and 1; sorted. 256 float32 values, -0.99297 .. 1."""
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        # float32 products with the scale (a Python scalar, so itself rounded to float32 first)
        values += (10.0 ** (i - 6) * means).tolist() + (-(10.0 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision thresholds between neighbouring codes, computed in float64 and rounded once (the constants
    of bitsandbytes' CUDA comparison tree are these midpoints)."""
    c = code.double()
    return ((c[:-1] + c[1:]) / 2).float()


_TINY = 1e-38  # a block of zeros has absmax 0: its values scale to 0 (code 7), not to NaN


class NF4Weight(nn.Module):
    """A frozen weight [out, in] in NF4 (module docstring), as buffers so it moves with the model.

    packed uint8 [ceil(n/2)]; absmax uint8 [blocks] (double-quantized) or float32 [blocks] (nested=False);
    nested_absmax, offsets float32 [groups] (empty when not nested); code float32 [16]; nested_code
    float32 [256]. `dtype` is the dtype it dequantizes to by default (the one it was quantized from)."""

    def __init__(self, packed, absmax, nested_absmax, offsets, code, nested_code, shape, dtype, *,
                 blocksize: int = BLOCKSIZE, nested_blocksize: int = NESTED_BLOCKSIZE):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("nested_absmax", nested_absmax)
        self.register_buffer("offsets", offsets)
        self.register_buffer("code", code)
        self.register_buffer("nested_code", nested_code)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize, self.nested_blocksize = int(blocksize), int(nested_blocksize)
        self.requires_grad = False  # read like a frozen Parameter's flag
        check_layout(self)

    @property
    def nested(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored format: what the frozen weight occupies."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, dtype={str(self.dtype).removeprefix('torch.')}, "
                f"blocksize={self.blocksize}, nested={self.nested}")


def check_layout(w: NF4Weight) -> None:
    """The buffers' sizes agree with the shape and block sizes; a ValueError saying which does not."""
    n = w.numel()
    blocks = -(-n // w.blocksize)
    expect = {"packed": (n + 1) // 2, "absmax": blocks, "code": 16}
    if w.nested:
        groups = -(-blocks // w.nested_blocksize)
        expect.update(nested_absmax=groups, offsets=groups, nested_code=256)
    if w.blocksize % 2 or w.blocksize < 2:
        raise ValueError(f"NF4 blocksize must be even, got {w.blocksize}")
    for name, size in expect.items():
        got = getattr(w, name).numel()
        if got != size:
            raise ValueError(f"NF4 weight of shape {tuple(w.shape)}: {name} has {got} values, expected {size}")


def is_nf4(weight) -> bool:
    return isinstance(weight, NF4Weight)


# ----------------------------------------------------------------------------- quantization (PyTorch, any device)

_CHUNK = BLOCKSIZE * (1 << 18)  # values quantized at once: bounds the float32 temporaries to ~64 MB


def _nearest(scaled: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (ties to the lower one): the number of midpoints below the value."""
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def quantize_nf4(weight: torch.Tensor, name: str = "weight", *, double_quant: bool = True,
                 dtype: torch.dtype | None = None) -> NF4Weight:
    """NF4 of a 2-D float weight (module docstring), on the weight's device. `name` names it in errors:
    a weight with NaN or inf values is refused. dtype: what it dequantizes to by default (the weight's)."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: NF4 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: NF4 quantizes float weights, got {weight.dtype}")
    bad = (~torch.isfinite(weight)).sum().item()
    if bad:
        raise ValueError(f"{name}: {bad} NaN or inf value(s) in a weight of shape {tuple(weight.shape)}; "
                         "NF4 quantization needs finite weights")
    device = weight.device
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    blocks = -(-n // BLOCKSIZE)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    bounds = _midpoints(code)
    packed = torch.empty(blocks * BLOCKSIZE // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=device)
    for start in range(0, n, _CHUNK):
        part = flat[start:start + _CHUNK].float()
        nb = -(-part.numel() // BLOCKSIZE)
        part = F.pad(part, (0, nb * BLOCKSIZE - part.numel())).view(nb, BLOCKSIZE)  # zeros: absmax unchanged
        amax = part.abs().amax(1)
        q = _nearest(part * (1.0 / amax.clamp_min(_TINY))[:, None], bounds).view(-1)
        b0 = start // BLOCKSIZE
        absmax[b0:b0 + nb] = amax
        packed[b0 * BLOCKSIZE // 2:(b0 + nb) * BLOCKSIZE // 2] = (q[0::2] << 4) | q[1::2]
    packed = packed[:(n + 1) // 2].clone()
    if not double_quant:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return NF4Weight(packed, absmax, empty, empty, code, empty, weight.shape, dtype or weight.dtype)
    nested_code = dynamic_map().to(device)
    offset = absmax.mean()
    groups = -(-blocks // NESTED_BLOCKSIZE)
    centred = F.pad(absmax - offset, (0, groups * NESTED_BLOCKSIZE - blocks)).view(groups, NESTED_BLOCKSIZE)
    absmax2 = centred.abs().amax(1)
    qabs = _nearest(centred * (1.0 / absmax2.clamp_min(_TINY))[:, None], _midpoints(nested_code)).view(-1)[:blocks]
    return NF4Weight(packed, qabs.clone(), absmax2, offset.expand(groups).clone(), code, nested_code, weight.shape,
                     dtype or weight.dtype)


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """float32 [blocks]: each block's absmax, rebuilt from the double quantization (float32, mul then add)."""
    if not w.nested:
        return w.absmax.float()
    blocks = w.absmax.numel()
    scale = w.nested_code[w.absmax.long()] * w.nested_absmax.repeat_interleave(w.nested_blocksize)[:blocks]
    return scale + w.offsets.repeat_interleave(w.nested_blocksize)[:blocks]


def dequantize_nf4_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain PyTorch: the dense weight [out, in] in dtype (default w.dtype)."""
    n, blocks = w.numel(), w.absmax.numel()
    byte = torch.arange(256, device=w.device)
    pairs = torch.stack([w.code[byte >> 4], w.code[byte & 15]], 1)  # the two values of each byte, high nibble first
    values = F.pad(pairs[w.packed.long()].view(-1), (0, blocks * w.blocksize - 2 * w.packed.numel()))
    values = values.view(blocks, w.blocksize) * block_absmax(w)[:, None]
    return values.view(-1)[:n].to(dtype or w.dtype).view(w.shape)


def stack_nf4(parts: list[NF4Weight]) -> NF4Weight | None:
    """One NF4Weight of the row-stacked parts [W_0; W_1; ...] (q/k/v, gate/up), or None when their blocks
    would not line up (a part but the last whose size is not a multiple of blocksize x nested_blocksize) or
    their formats differ. The parts' buffers become views of the stack's, so nothing is stored twice."""
    first = parts[0]
    group = first.blocksize * first.nested_blocksize
    same = all(p.nested and p.blocksize == first.blocksize and p.nested_blocksize == first.nested_blocksize
               and p.shape[1] == first.shape[1] and p.device == first.device and torch.equal(p.code, first.code)
               and torch.equal(p.nested_code, first.nested_code) for p in parts)
    if not same or any(p.numel() % group for p in parts[:-1]):
        return None
    stacked = NF4Weight(*(torch.cat([getattr(p, name) for p in parts])
                          for name in ("packed", "absmax", "nested_absmax", "offsets")),
                        first.code, first.nested_code, (sum(p.shape[0] for p in parts), first.shape[1]), first.dtype,
                        blocksize=first.blocksize, nested_blocksize=first.nested_blocksize)
    starts = dict.fromkeys(("packed", "absmax", "nested_absmax", "offsets"), 0)
    for p in parts:
        for name, start in starts.items():
            size = getattr(p, name).numel()
            setattr(p, name, getattr(stacked, name)[start:start + size])
            starts[name] = start + size
    return stacked


# ----------------------------------------------------------------------------- Triton kernel

BLOCK_BYTES = 1024  # packed bytes per program: elementwise and memory-bound, one size serves every shape

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._gemm import grouped_tile, lowrank_tile

    @triton.jit
    def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, offsets_ptr, code_ptr, nested_code_ptr,
                               out_ptr, n_elements, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                               NESTED_BLOCKSIZE: tl.constexpr, BLOCK_BYTES: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        ok = byte < (n_elements + 1) // 2
        packed = tl.load(packed_ptr + byte, mask=ok, other=0)
        block = byte // (BLOCKSIZE // 2)  # both nibbles of a byte lie in one block
        if NESTED:
            group = block // NESTED_BLOCKSIZE
            q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
            # two roundings, as bitsandbytes computes it (the launch turns off fused multiply-add)
            scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + group, mask=ok, other=0.0)
            scale = scale + tl.load(offsets_ptr + group, mask=ok, other=0.0)
        else:
            scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
        high = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale
        low = tl.load(code_ptr + (packed & 15).to(tl.int32)) * scale
        values = tl.reshape(tl.join(high, low), [2 * BLOCK_BYTES])  # element 2j is byte j's high nibble
        elem = pid * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
        tl.store(out_ptr + elem, values.to(out_ptr.dtype.element_ty), mask=elem < n_elements)

    _OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}
    _AOT_TYPES = {"packed_ptr": "*u8", "nested_absmax_ptr offsets_ptr code_ptr nested_code_ptr": "*fp32"}

    def _aot_specs():
        specs = []
        for dtype in ("bf16", "fp16", "fp32"):
            for nested in (True, False):
                types = {**_AOT_TYPES, "absmax_ptr": "*u8" if nested else "*fp32"}
                spec = aot_spec(_nf4_dequantize_kernel, dtype, {"NESTED": nested, "BLOCKSIZE": BLOCKSIZE,
                                                                "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE,
                                                                "BLOCK_BYTES": BLOCK_BYTES}, types=types)
                specs.append(spec._replace(options=dict(_OPTIONS)))
        return specs

    AOT_SPECS = _aot_specs()


    # ------------------------------------------------------------------------- the fused variant: NF4 in the GEMM

    @triton.jit
    def _nf4_values(packed_ptr, absmax_ptr, nested_absmax_ptr, offsets_ptr, code_ptr, nested_code_ptr, elem,
                    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
        """float32 values of a double-quantized NF4 weight at the flat indices `elem` (any shape), computed as
        the dequantize kernel computes them."""
        packed = tl.load(packed_ptr + (elem >> 1))
        nibble = tl.where((elem & 1) == 0, packed >> 4, packed & 15).to(tl.int32)
        block = elem // BLOCKSIZE
        group = block // NESTED_BLOCKSIZE
        scale = tl.load(nested_code_ptr + tl.load(absmax_ptr + block).to(tl.int32)) * tl.load(nested_absmax_ptr + group)
        scale = scale + tl.load(offsets_ptr + group)
        return tl.load(code_ptr + nibble) * scale

    @triton.jit
    def _nf4_mm_kernel(
        a_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, offsets_ptr, code_ptr, nested_code_ptr, c_ptr, bias_ptr,
        e_ptr, f_ptr, M, N, K, R, stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_cn, stride_em,
        stride_er, stride_fr, stride_fn,
        HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """C[M, N] = A[M, K] @ W'[K, N] (+ E[M, R] @ F[R, N]) (+ bias[n]), W'[k, n] the NF4 weight's value at flat
        index k * stride_wk + n * stride_wn: x W^T with strides (1, in), dY W with (in, 1). Each W' tile is
        dequantized in registers, cast to A's dtype (the values the dequantize kernel would have stored) and fed
        to tl.dot; nothing dense is written. Tiles in grouped (GROUP_M) order; rows and columns of the loads
        wrap (modulo M, N), the K tail is masked."""
        offs_m, offs_n, rows, cols = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LOWRANK:
            acc = lowrank_tile(acc, e_ptr, stride_em, stride_er, f_ptr, stride_fr, stride_fn, rows, cols, R, 0, R,
                               BLOCK_R, DOT_PRECISION, False)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
            elem = (k % K).to(tl.int64)[:, None] * stride_wk + cols[None, :] * stride_wn  # wraps: masked below
            w = _nf4_values(packed_ptr, absmax_ptr, nested_absmax_ptr, offsets_ptr, code_ptr, nested_code_ptr, elem,
                            BLOCKSIZE, NESTED_BLOCKSIZE)
            w = tl.where(k_ok[:, None], w, 0.0).to(a.dtype)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        col_ok = offs_n < N
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & col_ok[None, :])

    def _mm_config(bm, bn, bk, stages, warps):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages,
                             num_warps=warps)

    # Few pipeline stages: each stage buffers the tile's gathered codes and absmax in shared memory too (three
    # stages of 128 x 128 x 64 need 290 KB on sm_90; these need 32-115 KB, so they fit sm_80 as well).
    MM_CONFIGS = [_mm_config(128, 128, 32, 2, 8), _mm_config(128, 128, 64, 1, 8), _mm_config(128, 64, 64, 2, 4),
                  _mm_config(64, 64, 32, 2, 4), _mm_config(32, 64, 64, 2, 4)]
    _tuned_mm = triton.autotune(configs=MM_CONFIGS, key=["N", "K", "R", "stride_wk", "HAS_LOWRANK"])(_nf4_mm_kernel)
    INTERPRETER_MM = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}

    def _aot_mm_specs():
        specs = []
        for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
            for unit in ("stride_wk", "stride_wn"):  # x W^T (forward) and dY W (dX)
                consts = {unit: 1, "stride_ak": 1, "stride_cn": 1, "HAS_BIAS": False, "HAS_LOWRANK": True,
                          "DOT_PRECISION": precision, "BLOCKSIZE": BLOCKSIZE, "NESTED_BLOCKSIZE": NESTED_BLOCKSIZE,
                          "BLOCK_R": 16}
                config = MM_CONFIGS[0] if dtype == "bf16" else MM_CONFIGS[-1]
                spec = aot_spec(_nf4_mm_kernel, dtype, consts, types={**_AOT_TYPES, "absmax_ptr": "*u8"},
                                config=config)
                specs.append(spec._replace(options={**spec.options, "enable_fp_fusion": False}))
        return specs

    AOT_SPECS = AOT_SPECS + _aot_mm_specs()


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMM_MODES = ("dequantize", "fused")


def gemm_mode() -> str:
    """How the LoRA kernels multiply by an NF4 weight (LORAFUSE_NF4_GEMM): "dequantize" (the default: the dequantize
    kernel writes the dense weight, the GEMM reads it) or "fused" (nf4_matmul dequantizes each tile in the GEMM)."""
    mode = os.environ.get("LORAFUSE_NF4_GEMM", "dequantize")
    if mode not in GEMM_MODES:
        raise ValueError(f"LORAFUSE_NF4_GEMM must be one of {', '.join(GEMM_MODES)}; got {mode!r}")
    return mode


def nf4_matmul(out, a, w: NF4Weight, *, transpose: bool, bias=None, lowrank=None):
    """out[M, N] = a @ W^T (transpose, N = out features) or a @ W (N = in features), + E @ F (lowrank: (E [M, R], F,
    (stride_fr, stride_fn))) + bias, with W's tiles dequantized inside the GEMM (double-quantized NF4 only)."""
    from ._launch import dot_precision

    assert w.nested, "the fused NF4 GEMM reads double-quantized weights"
    count("nf4_matmul")
    M, N = out.shape
    K = a.shape[1]
    if M == 0 or N == 0:
        return out
    stride_wk, stride_wn = (1, w.shape[1]) if transpose else (w.shape[1], 1)
    if lowrank is not None:
        e, f, (stride_fr, stride_fn) = lowrank
        R = e.shape[1]
    else:
        e, f, stride_fr, stride_fn, R = out, out, 0, 0, 0
    args = (a, w.packed, w.absmax, w.nested_absmax, w.offsets, w.code, w.nested_code, out,
            bias if bias is not None else out, e, f, M, N, K, R, a.stride(0), a.stride(1), stride_wk, stride_wn,
            out.stride(0), out.stride(1), e.stride(0), e.stride(1), stride_fr, stride_fn)
    flags = dict(HAS_BIAS=bias is not None, HAS_LOWRANK=R > 0, DOT_PRECISION=dot_precision(out.dtype),
                 BLOCKSIZE=w.blocksize, NESTED_BLOCKSIZE=w.nested_blocksize,
                 BLOCK_R=min(64, max(16, 1 << max(R - 1, 0).bit_length())))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(_nf4_mm_kernel, _tuned_mm, grid, *args, interpreted=INTERPRETER_MM, enable_fp_fusion=False, **flags)
    return out


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight [out, in] in dtype (default w.dtype): Triton on CUDA (and in the interpreter), else
    the PyTorch reference. Never differentiable: NF4 weights are frozen."""
    dtype = dtype or w.dtype
    if not use_triton(w.packed):
        return dequantize_nf4_reference(w, dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dequantize_nf4 writes float16, bfloat16 or float32, not {dtype}")
    count("dequantize_nf4")
    out = empty_output(w.shape, dtype, w.device)
    n = w.numel()
    if n == 0:
        return out
    args = (w.packed, w.absmax, w.nested_absmax if w.nested else w.absmax, w.offsets if w.nested else w.absmax,
            w.code, w.nested_code if w.nested else w.code, out, n)
    grid = (triton.cdiv((n + 1) // 2, BLOCK_BYTES),)
    launch(_nf4_dequantize_kernel, _nf4_dequantize_kernel, grid, *args, interpreted={}, NESTED=w.nested,
           BLOCKSIZE=w.blocksize, NESTED_BLOCKSIZE=w.nested_blocksize, BLOCK_BYTES=BLOCK_BYTES, **_OPTIONS)
    return out


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """A frozen weight as a dense tensor in dtype: an NF4Weight dequantized, a tensor cast if needed."""
    if is_nf4(weight):
        return dequantize_nf4(weight, dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


# ----------------------------------------------------------------------------- the linear on an NF4 weight


class NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + bias with W dequantized per call: forward and backward (dX = dY W) each dequantize it again,
    so no dense copy outlives the call. No gradient reaches W. `dequantize` is the dequantize function."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias, dequantize):
        ctx.weight, ctx.dequantize, ctx.has_bias = weight, dequantize, bias is not None
        return F.linear(x, dequantize(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = dy @ ctx.dequantize(ctx.weight, dy.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, None, dbias, None


def nf4_linear_reference(x, weight: NF4Weight, bias=None):
    """x W^T + bias, W dequantized by the PyTorch reference (and again in backward, not kept)."""
    return NF4LinearFunction.apply(x, weight, bias, dequantize_nf4_reference)
