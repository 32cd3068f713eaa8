"""LoRA linear: y = x W^T + bias + s * (x A^T) B^T.

Shapes (PEFT layout): x [..., in]; weight W [out, in] (frozen base); lora_a A [r, in];
lora_b B [out, r]; bias [out] or None; s = scaling (alpha / r, or alpha / sqrt(r) for rsLoRA).

Gradients, with dY [..., out] and the intermediate U = x A^T [..., r]:
  dX = dY W + s (dY B) A
  dA = s (dY B)^T x        dB = s dY^T U
  dW = dY^T x (only when W requires grad)   dbias = sum dY (only when bias requires grad)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



def lora_linear_reference(x, weight, lora_a, lora_b, scaling: float, bias=None):
    """Plain PyTorch: the definition above, differentiated by autograd."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b)


def lora_linear(x, weight, lora_a, lora_b, scaling: float, bias=None):
    """y = x @ weight.T + bias + scaling * (x @ lora_a.T) @ lora_b.T (see module docstring)."""
    return lora_linear_reference(x, weight, lora_a, lora_b, scaling, bias)
