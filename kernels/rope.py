"""Rotary position embedding with per-document positions (HF's rotate-half convention).

For position p and frequency f_j = inv_freq[j] (j < D/2), angle a = p * f_j, and s = attention_scaling:
  out[j]       = s * (x[j] cos a - x[j + D/2] sin a)
  out[j + D/2] = s * (x[j + D/2] cos a + x[j] sin a)
position_ids restart at 0 in each packed document. The backward is the rotation by -a.
"""

from __future__ import annotations

import torch


def apply_rope_reference(q, k, position_ids, inv_freq, attention_scaling: float = 1.0):
    """q [T, Hq, D], k [T, Hkv, D], position_ids [T] -> rotated (q, k), computed in float32."""
    freqs = position_ids[:, None].float() * inv_freq[None, :].float().to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * attention_scaling)[:, None, :]
    sin = (emb.sin() * attention_scaling)[:, None, :]

    def rotate(x):
        x32 = x.float()
        half = x.shape[-1] // 2
        rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)

    return rotate(q), rotate(k)


def apply_rope(q, k, position_ids, inv_freq, attention_scaling: float = 1.0):
    return apply_rope_reference(q, k, position_ids, inv_freq, attention_scaling)
