"""RoPE forward + backward at Llama-3-8B shapes (Hq 32, Hkv 8, head dim 128), 16k packed tokens, bf16.

Peers in one process: lorafuse's apply_rope (cos/sin from position_ids in-kernel, q and k in one
launch) and HF's apply_rotary_pos_emb with cos/sin tables [T, D] from LlamaRotaryEmbedding
(Llama-3.1 rope scaling). HF's tables are built once outside the timing, as a model builds them
once per forward for all layers, which favours HF. q and k are strided views of one fused qkv
projection output, as the engine produces them; each step runs the forward and
torch.autograd.grad of q and k.

bytes_moved is the minimum traffic, the same for both peers: q and k read and the outputs written,
forward and backward -> 4 T (Hq + Hkv) D e, plus position_ids (int64) twice. The `copy` case times
a clone of the q and k bytes for the bandwidth the GPU delivers in this run.
"""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels import apply_rope

from benchutil import SMOKE, measure

TOKENS, Q_HEADS, KV_HEADS, HEAD_DIM = (8, 4, 2, 16) if SMOKE else (16384, 32, 8, 128)
DOC_LEN = 4 if SMOKE else 4096
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rotary(device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=Q_HEADS * HEAD_DIM, num_attention_heads=Q_HEADS,
                         num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=131072,
                         rope_parameters=dict(LLAMA3_ROPE))
    return LlamaRotaryEmbedding(config).to(device)


@pytest.mark.parametrize("system", ["copy", "lorafuse", "hf"])
def test_rope_fwd_bwd(benchmark, system, device, dtype):
    elem = torch.finfo(dtype).bits // 8
    qkv = torch.randn(TOKENS, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, device=device, dtype=dtype)
    q = qkv[:, :Q_HEADS * HEAD_DIM].view(TOKENS, Q_HEADS, HEAD_DIM)
    k = qkv[:, Q_HEADS * HEAD_DIM:(Q_HEADS + KV_HEADS) * HEAD_DIM].view(TOKENS, KV_HEADS, HEAD_DIM)
    position_ids = torch.arange(TOKENS, device=device) % DOC_LEN  # documents of DOC_LEN tokens
    qk_bytes = (q.numel() + k.numel()) * elem
    info = dict(system=system, shape=f"T{TOKENS}-Hq{Q_HEADS}-Hkv{KV_HEADS}-D{HEAD_DIM}",
                dtype=str(dtype).removeprefix("torch."), op="rope", direction="fwd+bwd")
    if system == "copy":
        qk = torch.cat([q.reshape(TOKENS, -1), k.reshape(TOKENS, -1)], dim=1)
        measure(benchmark, qk.clone, bytes_moved=2 * qk_bytes, **info)
        return
    q.requires_grad_()
    k.requires_grad_()
    dq = torch.randn(q.shape, device=device, dtype=dtype)
    dk = torch.randn(k.shape, device=device, dtype=dtype)
    rotary = _rotary(device)
    if system == "lorafuse":
        inv_freq, scaling = rotary.inv_freq.float(), float(rotary.attention_scaling)
        rope = lambda: apply_rope(q, k, position_ids, inv_freq, scaling)
    else:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        with torch.no_grad():
            cos, sin = rotary(qkv, position_ids[None])  # [1, T, D] in dtype, built once
        rope = lambda: apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)

    def step():
        q_out, k_out = rope()
        torch.autograd.grad((q_out, k_out), (q, k), (dq, dk))

    if not SMOKE:
        step()  # autotune outside the timing
    measure(benchmark, step, bytes_moved=2 * 2 * qk_bytes + 2 * 8 * TOKENS, **info)
