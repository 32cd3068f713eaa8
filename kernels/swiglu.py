"""SwiGLU activation: h = silu(g) * u = g * sigmoid(g) * u, in float32, returned in g's dtype.

Backward: with sg = sigmoid(g), dg = dh * u * sg * (1 + g (1 - sg)), du = dh * g * sg.
"""

from __future__ import annotations

import torch.nn.functional as F


def swiglu_reference(gate, up):
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate, up):
    return swiglu_reference(gate, up)
