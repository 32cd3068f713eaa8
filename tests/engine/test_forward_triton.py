"""The training forward and backward of a micro model through the real Triton kernels (Triton's
interpreter on CPU) equal the PyTorch-reference path, and every kernel really ran."""

import numpy as np
import pytest
import torch

from lorafuse.engine.config import LoraConfig
from lorafuse.engine.data import Document
from lorafuse.engine.demo.base_model import build_model, tiny_config
from lorafuse.engine.forward import packed_loss
from lorafuse.engine.lora import inject_lora, lora_modules, lora_parameters
from lorafuse.engine.model import load_model
from lorafuse.engine.packing import make_batch
from lorafuse.engine.prepare import prepare_model

from engine_utils import reference_then_kernels


def test_micro_qwen3_through_triton_kernels_matches_reference(tmp_path, monkeypatch):
    # qwen3: q/k norms too; head_dim 16 keeps the interpreter quick
    build_model(tiny_config("qwen3", vocab_size=97, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=48,
                            head_dim=16), tmp_path, seed=2)
    model = load_model(tmp_path, torch.float32, torch.device("cpu"))
    prepared = prepare_model(model)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"]))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    rng = np.random.default_rng(0)
    batch = make_batch([Document(rng.integers(3, 97, n), rng.random(n) < 0.8) for n in (11, 1, 6)])
    params = lora_parameters(model)

    ref_loss, ref_grads, loss, grads, ran = reference_then_kernels(
        monkeypatch, lambda: packed_loss(prepared, batch), lambda: packed_loss(prepared, batch), params)
    assert {"lora_linear", "lora_linear_group", "lora_mlp", "rms_norm", "apply_rope", "varlen_attention",
            "fused_linear_cross_entropy"} <= ran, ran

    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= 1e-3 * r.norm() + 1e-7


@pytest.mark.parametrize(("model_type", "extra"), [
    # Gemma 2: GeGLU, (1 + w) and sandwich norms, attention and final softcaps, a window on alternate layers
    ("gemma2", {"head_dim": 16, "sliding_window": 4, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                "query_pre_attn_scalar": 12, "layers": 2}),
    # Phi-3: fused qkv and gate_up projections, one adapter each, a window on every layer
    ("phi3", {"head_dim": 16, "sliding_window": 5, "layers": 1}),
])
def test_micro_models_of_other_families_through_triton_kernels(tmp_path, monkeypatch, model_type, extra):
    layers = extra.pop("layers")
    build_model(tiny_config(model_type, vocab_size=97, hidden=32, layers=layers, heads=2, kv_heads=1, intermediate=48,
                            **extra), tmp_path, seed=2)
    model = load_model(tmp_path, torch.float32, torch.device("cpu"))
    prepared = prepare_model(model)
    inject_lora(model, LoraConfig(r=4, alpha=8))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    rng = np.random.default_rng(1)
    batch = make_batch([Document(rng.integers(3, 97, n), rng.random(n) < 0.8) for n in (9, 1, 7)])
    params = lora_parameters(model)

    ref_loss, ref_grads, loss, grads, ran = reference_then_kernels(
        monkeypatch, lambda: packed_loss(prepared, batch), lambda: packed_loss(prepared, batch), params)
    assert {"lora_linear", "lora_mlp", "rms_norm", "apply_rope", "varlen_attention",
            "fused_linear_cross_entropy"} <= ran, ran
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= 1e-3 * r.norm() + 1e-7


def test_attention_computes_k_and_v_again_instead_of_keeping_them(tmp_path, monkeypatch):
    """A Llama layer's attention keeps no k or v (they are computed again from the layer input in its backward,
    forward.keys_and_values_again): the saved storages shrink by exactly k's and v's, and the loss and gradients
    are those of the run that keeps them (the same kernels on the same values)."""
    from lorafuse.engine import forward
    from lorafuse.engine.activations.planner import measure_bytes_per_token

    hidden, kv_heads, head_dim = 32, 1, 16
    build_model(tiny_config("llama", vocab_size=97, hidden=hidden, layers=1, heads=2, kv_heads=kv_heads,
                            intermediate=48, head_dim=head_dim), tmp_path, seed=3)
    model = load_model(tmp_path, torch.float32, torch.device("cpu"))
    prepared = prepare_model(model)
    inject_lora(model, LoraConfig(r=4, alpha=8))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    params = lora_parameters(model)
    rng = np.random.default_rng(3)

    def documents(n):
        return make_batch([Document(rng.integers(3, 97, k), rng.random(k) < 0.8) for k in (n // 2, n - n // 2)])

    fixed = documents(17)
    layer = prepared.layers[0]
    results, saved = [], []
    for recompute in (False, True):
        if not recompute:
            monkeypatch.setattr(forward, "keys_and_values_again", lambda *args: None)
        loss = packed_loss(prepared, fixed)
        results.append((loss, torch.autograd.grad(loss, params)))
        saved.append(measure_bytes_per_token(
            lambda batch: forward.decoder_layer(model.model.embed_tokens(batch.input_ids), layer, batch, prepared),
            lambda n: (documents(n),), tokens=(8, 16)))
        monkeypatch.undo()
    (kept_loss, kept_grads), (loss, grads) = results
    assert torch.equal(loss, kept_loss)
    for g, r in zip(grads, kept_grads, strict=True):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)
    assert saved[0] - saved[1] == 2 * kv_heads * head_dim * 4  # k and v, float32
