"""A tiny Llama-like decoder layer for activation-checkpointing tests: RMSNorm and SwiGLU as custom
autograd Functions (so their saved tensors pass through the checkpoint's hooks as the real kernels'
do), LoRA on frozen linears, RoPE and per-document causal attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNormFunction(torch.autograd.Function):
    """Saves its input and rstd with save_for_backward, and eps as a plain ctx attribute."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        return (x.float() * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x32, g32 = x.float(), grad.float()
        normed = x32 * rstd
        grad_weight = (g32 * normed).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gn = g32 * weight.float()
        grad_x = rstd * (gn - normed * (gn * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        return grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig


class LoRALinear(torch.nn.Module):
    def __init__(self, d_in, d_out, rank):
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out, bias=False)
        self.base.weight.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(rank, d_in) / d_in**0.5)
        self.lora_b = torch.nn.Parameter(torch.randn(d_out, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t() * 2.0


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TinyLlamaBlock(torch.nn.Module):
    def __init__(self, hidden=24, intermediate=40, heads=4, kv_heads=2, rank=3):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.input_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))  # trainable: a base-weight grad
        self.post_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden), requires_grad=False)
        self.q = LoRALinear(hidden, heads * self.head_dim, rank)
        self.k = LoRALinear(hidden, kv_heads * self.head_dim, rank)
        self.v = LoRALinear(hidden, kv_heads * self.head_dim, rank)
        self.o = LoRALinear(heads * self.head_dim, hidden, rank)
        self.gate = LoRALinear(hidden, intermediate, rank)
        self.up = LoRALinear(hidden, intermediate, rank)
        self.down = LoRALinear(intermediate, hidden, rank)

    def forward(self, hidden, cos, sin, doc_len: int):
        tokens = hidden.shape[0]
        x = RMSNormFunction.apply(hidden, self.input_norm, 1e-6)
        q = rope(self.q(x).view(tokens, self.heads, self.head_dim), cos, sin)
        k = rope(self.k(x).view(tokens, self.kv_heads, self.head_dim), cos, sin)
        v = self.v(x).view(tokens, self.kv_heads, self.head_dim)
        docs = tokens // doc_len  # documents of doc_len tokens back to back: a batch of causal attentions

        def per_doc(t):
            return t.view(docs, doc_len, t.shape[1], self.head_dim).transpose(1, 2)

        attn = F.scaled_dot_product_attention(per_doc(q), per_doc(k), per_doc(v), is_causal=True,
                                              enable_gqa=True)
        attn = attn.transpose(1, 2).reshape(tokens, self.heads * self.head_dim)
        hidden = hidden + self.o(attn)
        x = RMSNormFunction.apply(hidden, self.post_norm, 1e-6)
        return hidden + self.down(SwiGLUFunction.apply(self.gate(x), self.up(x)))


def rope_tables(tokens, doc_len, head_dim, dtype=torch.float32, device="cpu"):
    positions = torch.arange(tokens, device=device) % doc_len
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = positions[:, None].double() * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]  # [T, 1, D]: broadcast over heads
    return angles.cos().to(dtype), angles.sin().to(dtype)
