"""RMSNorm: y = x / rms(x) * (offset + w), rms(x) = sqrt(mean(x^2) + eps), over the last dim.

offset is 0 for Llama/Qwen/Mistral and 1 for Gemma's (1 + w). Computed in float32, returned in
x's dtype.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x, weight, eps: float, offset: float = 0.0):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


def rms_norm(x, weight, eps: float, offset: float = 0.0):
    return rms_norm_reference(x, weight, eps, offset)
