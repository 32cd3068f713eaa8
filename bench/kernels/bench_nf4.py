"""NF4 (QLoRA) frozen weights: the dequantize kernel, and the two ways a LoRA GEMM can read an NF4 weight.

At Llama-3.1-8B and Llama-3.1-70B projection shapes, bf16, per token count:
- dequantize: nf4.dequantize_nf4 alone (bytes moved: 0.5 + 1/64 read, 2 written per value);
- lorafuse (LORAFUSE_NF4_GEMM=dequantize, the default): lora_linear on the NF4 weight, forward + backward:
  the dequantize kernel writes the dense weight before each GEMM that reads it (x W^T, dY W);
- fused (LORAFUSE_NF4_GEMM=fused): the same lora_linear with nf4_matmul dequantizing each W tile in the GEMM;
- bf16: lora_linear on the dense bf16 weight: the floor both NF4 paths pay on top of;
- peft_bnb (where bitsandbytes imports): PEFT's LoRA on a bitsandbytes Linear4bit of the same values.

Which is faster is for a GPU run to record. Expected: at training token counts (thousands per step) the GEMM is
compute-bound and every M tile of the fused kernel re-reads and re-dequantizes the same W tile (gathers,
nibble selects, two multiplies per value in the inner loop, next to the tensor-core MMAs, with fewer pipeline
stages since the gathered tiles share the shared memory), while the dequantize kernel does that work once per
weight and call at memory speed (about 2.5 bytes moved per value, against the GEMM's 2 x tokens FLOPs per value)
and leaves the GEMM at full speed: dequantize-then-GEMM should win. At a few tokens (generation), the GEMM is
memory-bound and the fused kernel reads 4.1 bits per weight instead of 4.1 + 16 + 16: fused should win there.
FLOPs as DESIGN.md counts them: 4 per frozen weight per token (forward and dX) and 6 per LoRA weight.
"""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels import lora_linear
from lorafuse.kernels.nf4 import dequantize_nf4, quantize_nf4

from benchutil import SMOKE, measure

RANK, ALPHA = 16, 32.0
SCALING = ALPHA / RANK
if SMOKE:  # CPU: the interpreter, tiny sizes, each case once
    SHAPES, TOKENS = {"tiny": [(40, 24)]}, [16]
else:
    SHAPES = {  # (in, out) of the projections: q, o / k, v / gate, up / down (70B: 8192 hidden, 28672 MLP)
        "llama-3.1-8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
        "llama-3.1-70b": [(8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)],
    }
    TOKENS = [16, 8192]
CASES = [(model, n_in, n_out) for model, shapes in SHAPES.items() for n_in, n_out in shapes]


def _weight(n_out, n_in, device, dtype):
    return (torch.randn(n_out, n_in, device=device) * n_in ** -0.5).to(dtype)


@pytest.mark.parametrize("model,n_in,n_out", CASES)
def test_dequantize(benchmark, device, dtype, model, n_in, n_out):
    q = quantize_nf4(_weight(n_out, n_in, device, dtype))
    itemsize = torch.empty((), dtype=dtype).element_size()
    measure(benchmark, lambda: dequantize_nf4(q, dtype), bytes_moved=q.nbytes + q.numel() * itemsize,
            system="dequantize", model=model, shape=f"{n_in}->{n_out}", dtype=str(dtype), block="nf4")


@pytest.mark.parametrize("system", ["lorafuse", "fused", "bf16", "peft_bnb"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("model,n_in,n_out", CASES)
def test_lora_projection_on_nf4(benchmark, monkeypatch, device, dtype, system, tokens, model, n_in, n_out):
    weight = _weight(n_out, n_in, device, dtype)
    x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
    a = (torch.randn(RANK, n_in, device=device) * n_in ** -0.5).to(dtype).requires_grad_()
    b = (torch.randn(n_out, RANK, device=device) * 0.01).to(dtype).requires_grad_()
    if system in ("lorafuse", "fused"):
        monkeypatch.setenv("LORAFUSE_NF4_GEMM", "fused" if system == "fused" else "dequantize")
        q = quantize_nf4(weight)
        forward, inputs = (lambda: lora_linear(x, q, a, b, SCALING)), [x, a, b]
    elif system == "bf16":
        forward, inputs = (lambda: lora_linear(x, weight, a, b, SCALING)), [x, a, b]
    else:
        layer, params = _peft_bnb(weight, a, b)
        forward, inputs = (lambda: layer(x)), [x, *params]
    out = forward()
    dy = torch.randn_like(out)

    def step():
        torch.autograd.grad(forward(), inputs, dy)

    if not SMOKE:
        step()  # compile and autotune before timing
    measure(benchmark, step, flops=tokens * (4 * n_in * n_out + 6 * RANK * (n_in + n_out)), system=system,
            model=model, shape=f"{n_in}->{n_out}", tokens=tokens, rank=RANK, dtype=str(dtype), block="nf4")


def _peft_bnb(weight, a, b):
    """PEFT's LoRA around a bitsandbytes Linear4bit (NF4, double quantization, blocksize 64) of `weight`."""
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except Exception as e:  # noqa: BLE001 - a peer: skipped where it does not import
        pytest.skip(f"bitsandbytes or its PEFT layer does not import ({type(e).__name__})")
    n_out, n_in = weight.shape
    base = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=weight.dtype, compress_statistics=True,
                             quant_type="nf4", device="meta")
    base.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, compress_statistics=True, quant_type="nf4",
                                    blocksize=64)
    base = base.to(weight.device)
    layer = LoraLinear4bit(base, "default", config=LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0), r=RANK,
                           lora_alpha=ALPHA)
    layer.lora_A["default"].to(device=weight.device, dtype=weight.dtype).weight.data.copy_(a)
    layer.lora_B["default"].to(device=weight.device, dtype=weight.dtype).weight.data.copy_(b)
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
