"""How a kernel runs once _dispatch has chosen Triton: its output buffers, its launch, its dot precision, the
variants that kernels/aot.py compiles ahead of time, and the count of Triton calls per op.

Every kernel file takes these from here, so a rule changes in one place: tests poison every output buffer by
setting POISON, the interpreter's fixed configs and the autotuners meet in `launch`, float32 dots follow one
rule (`dot_precision`), and an AOT variant is always written as aot_spec(kernel, dtype, constexprs, types=...,
config=...).
"""

from __future__ import annotations

import inspect
from collections import Counter
from typing import NamedTuple

import torch

from ._dispatch import INTERPRETED

# Calls per op that took the Triton path, so a test can prove the kernels ran rather than the reference.
# Not public API: tests import it from here.
launches: Counter = Counter()


def count(op: str) -> None:
    launches[op] += 1


# Tests set this to NaN: then every buffer a kernel is meant to fill starts as NaN, and an element it forgets
# to write shows up in the results.
POISON: float | None = None


def empty_output(shape, dtype, device) -> torch.Tensor:
    """A buffer that a kernel (or a GEMM with out=) fills completely: every such buffer comes from here."""
    buf = torch.empty(shape, dtype=dtype, device=device)
    return buf if POISON is None else buf.fill_(POISON)


def launch(kernel, tuned, grid, /, *args, interpreted: dict, **meta):
    """kernel[grid](*args, **meta), with the block sizes chosen per shape by `tuned`, the kernel's autotuner.

    The interpreter is slow and has nothing to time, so there the kernel itself runs with the small fixed
    config `interpreted` (block sizes). grid is a tuple or, as Triton takes it, a function of the meta
    parameters (the chosen config included)."""
    if INTERPRETED:
        meta = {**meta, **interpreted}
        kernel[grid(meta) if callable(grid) else grid](*args, **meta)
    else:
        tuned[grid](*args, **meta)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of `dtype`; only float32 has a choice.

    float32 dots do what torch's own float32 matmul on a GPU does: TF32 only where the user allowed it
    (torch.backends.cuda.matmul.allow_tf32, or torch.set_float32_matmul_precision("high")), IEEE otherwise.
    DESIGN.md wants a result no further from the float64 reference than stock PyTorch in the same dtype: with
    TF32 always on, a float32 lora_linear would land outside the float32 tolerance (1e-4) where F.linear
    lands inside it. The fused cross-entropy path then agrees with the chunked one, whose logits come from
    torch.mm under the same setting. The interpreter multiplies float32 in numpy, IEEE whatever torch's CUDA
    setting says, so there "ieee" is what runs.
    """
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs
    if INTERPRETED:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    tf32 = matmul.allow_tf32 or getattr(matmul, "fp32_precision", None) == "tf32"
    return "tf32" if tf32 else "ieee"


# ----------------------------------------------------------------------------- ahead-of-time variants


class AotSpec(NamedTuple):
    """One variant for kernels/aot.py to compile: the JITFunction, each argument's Triton type ("*bf16",
    "i32", "fp32", "constexpr", ...) in the kernel's order, the constexpr values, and the launch options
    (num_warps, num_stages) of an autotune config ({} for Triton's defaults)."""

    kernel: object
    signature: dict
    constexprs: dict
    options: dict


def jit_function(kernel):
    """The @triton.jit function under @triton.autotune / @triton.heuristics wrappers (under the interpreter,
    which builds the specs at import too, an InterpretedFunction: it has arg_names, nothing to compile)."""
    from triton.runtime import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def rank_block(R: int) -> int:
    """Columns a program holds for R low-rank columns: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << max(0, (max(R, 1) - 1).bit_length()))


def meta_aot_spec(kernel, dtype: str, meta: dict, constexprs: dict, types: dict) -> AotSpec:
    """aot_spec of a kernel launched with `meta`, its block sizes and num_warps as a module's _meta gives them."""
    blocks = {k: v for k, v in meta.items() if k != "num_warps"}
    return aot_spec(kernel, dtype, {**constexprs, **blocks}, types=types)._replace(
        options={"num_warps": meta["num_warps"]})


def aot_spec(kernel, dtype: str, constexprs: dict | None = None, *, types: dict | None = None,
             config=None) -> AotSpec:
    """A variant of `kernel` for `dtype` tensors ("bf16", "fp16", "fp32"), its types derived from arg_names.

    An argument is "constexpr" when constexprs gives its value (every tl.constexpr parameter needs one, or a
    default in the kernel's signature; a unit stride may be given as 1, as a launch specialises it);
    otherwise its entry in `types`, else a pointer to `dtype` when its name ends in _ptr, else "i32" (strides
    and sizes: what a launch passes for values below 2^31). A key of `types` may name several arguments,
    space-separated; names a kernel does not take are skipped, so one table serves a module's kernels.
    config, a triton.Config of the kernel's autotune list, adds its block sizes to constexprs and gives
    num_warps and num_stages.
    """
    fn = jit_function(kernel)
    constexprs = {**(constexprs or {}), **(config.kwargs if config is not None else {})}
    for name, param in inspect.signature(fn.fn).parameters.items():
        if param.default is not inspect.Parameter.empty and "constexpr" in str(param.annotation):
            constexprs.setdefault(name, param.default)
    unknown = set(constexprs) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"aot_spec({fn.__name__}): the kernel has no argument {sorted(unknown)}")
    named = {name: ty for names, ty in (types or {}).items() for name in names.split()}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in named:
            signature[name] = named[name]
        else:
            signature[name] = f"*{dtype}" if name.endswith("_ptr") else "i32"
    options = {} if config is None else {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return AotSpec(fn, signature, constexprs, options)


# ----------------------------------------------------------------------------- configs per architecture


# kernels/aot.py sets this while it records the launches of one architecture on meta tensors (no GPU)
ASSUMED_ARCH: int | None = None


def device_arch() -> int | None:
    """80 for Ampere and Ada (sm_8x), 90 for Hopper and later; None without a CUDA device."""
    if ASSUMED_ARCH is not None:
        return ASSUMED_ARCH
    if not torch.cuda.is_available():
        return None
    major, _ = torch.cuda.get_device_capability()
    return 90 if major >= 9 else 80


def arch_autotune(configs_by_arch: dict, key: list, prune=None, **kwargs):
    """triton.autotune whose configs depend on the GPU's architecture: configs_by_arch {80: [...], 90: [...]}.

    Registers and shared memory differ between sm_80 and sm_90 (and Hopper's wgmma wants other tiles), so a
    config that is right on one may spill on the other; kernels/aot.py compiles each list for its own
    architecture (the tuner's `arch_configs`). `prune`, an early_config_prune of the kernel's own, runs after."""
    import triton

    every: list = []
    for configs in configs_by_arch.values():
        every += [c for c in configs if not any(c is seen for seen in every)]

    def by_arch(configs, named_args, **kw):
        arch = device_arch()
        if arch is not None:  # without a GPU (aot.py) the list given is already the architecture's
            configs = [mine for mine in configs_by_arch[arch] if any(c is mine for c in configs)]
        return prune(configs, named_args, **kw) if prune is not None else configs

    tuner_factory = triton.autotune(configs=every, key=key, prune_configs_by={"early_config_prune": by_arch},
                                    **kwargs)

    def wrap(fn):
        tuner = tuner_factory(fn)
        tuner.arch_configs = configs_by_arch
        return tuner

    return wrap
