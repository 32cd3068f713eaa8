"""The packed training forward: equal to HF's own forward, and a packed micro-batch equals its
documents run one at a time (loss and every LoRA gradient)."""

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

pytestmark = pytest.mark.usefixtures("reference_kernels")


def random_docs(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [Document(rng.integers(3, vocab, n), rng.random(n) < 0.7) for n in lengths]


def hf_loss_sum(model, doc):
    """Sum of HF's per-token loss over the document's targets (HF shifts labels itself)."""
    ids = torch.from_numpy(doc.input_ids)[None]
    labels = torch.where(torch.from_numpy(doc.trained), ids, torch.full_like(ids, -100))
    labels[0, 0] = -100
    n = int((labels[0, 1:] != -100).sum())
    if n == 0:
        return torch.zeros(())
    return model(input_ids=ids, labels=labels).loss * n


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_packed_forward_equals_hf_forward(tmp_path, model_type):
    build_model(tiny_config(model_type, vocab_size=300, hidden=64, heads=4, kv_heads=2, intermediate=96),
                tmp_path, seed=1)
    model = load_model(tmp_path, torch.float32, torch.device("cpu"))
    inject_lora(model, LoraConfig(r=4, alpha=8))
    for m in lora_modules(model).values():  # non-zero B so the adapters matter
        torch.nn.init.normal_(m.lora_B, std=0.05)
    docs = random_docs([7, 1, 23, 12], 300)
    ours = packed_loss(prepare_model(model), make_batch(docs), reduction="sum")
    ref = sum(hf_loss_sum(model, d) for d in docs)
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-5


def test_packed_equals_one_document_at_a_time(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    inject_lora(model, LoraConfig(r=8, alpha=16))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    params = lora_parameters(model)
    docs = random_docs([31, 1, 9, 17, 2], model.config.vocab_size, seed=3)
    prepared = prepare_model(model)

    packed = packed_loss(prepared, make_batch(docs), reduction="sum")
    packed_grads = torch.autograd.grad(packed, params)

    single = sum(packed_loss(prepared, make_batch([d]), reduction="sum") for d in docs)
    single_grads = torch.autograd.grad(single, params)

    assert abs(packed.item() - single.item()) <= 1e-5 * abs(single.item())
    for g_packed, g_single in zip(packed_grads, single_grads):
        assert (g_packed - g_single).norm() <= 1e-5 * g_single.norm() + 1e-12
    assert sum(g.norm() for g in packed_grads) > 0  # the adapters really were trained


@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_checkpointing_modes_give_the_same_gradients(tiny_model_dir, mode):
    from lorafuse.engine.activations import LayerCheckpointer, layer_modes

    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    inject_lora(model, LoraConfig(r=4, alpha=8))
    params = lora_parameters(model)
    batch = make_batch(random_docs([20, 11], model.config.vocab_size, seed=4))
    prepared = prepare_model(model)
    plain = torch.autograd.grad(packed_loss(prepared, batch), params)
    checkpointer = LayerCheckpointer(torch.device("cpu"), layer_modes(mode, model.config.num_hidden_layers),
                                     min_offload_bytes=0)
    checkpointed = torch.autograd.grad(packed_loss(prepared, batch, checkpointer=checkpointer), params)
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)
    if mode == "offload":
        assert checkpointer.stats()["offloads"] >= 1


def test_stacked_projections_give_the_same_loss_and_gradients(tiny_model_dir):
    results = []
    for stacked in (False, True):
        model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
        prepared = prepare_model(model, stack_projections=stacked)
        torch.manual_seed(0)
        inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
        for m in lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B, std=0.05)
        batch = make_batch(random_docs([13, 8, 1], model.config.vocab_size, seed=6))
        loss = packed_loss(prepared, batch)
        results.append((loss, torch.autograd.grad(loss, lora_parameters(model))))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a.item() - loss_b.item()) <= 1e-6 * abs(loss_a.item())
    for a, b in zip(grads_a, grads_b):
        assert (a - b).norm() <= 1e-5 * a.norm() + 1e-12


def test_attention_choices(tiny_model_dir):
    from lorafuse.engine.attention import attention_function

    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    batch = make_batch(random_docs([9, 14], model.config.vocab_size, seed=7))
    losses = []
    for name in ("auto", "sdpa"):
        losses.append(packed_loss(prepare_model(model, attention=name, stack_projections=False), batch).item())
    assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0])
    for name in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            attention_function(name, "cpu")


def test_model_flops_count_frozen_and_lora_matmuls_and_causal_attention(tiny_model_dir):
    from lorafuse.engine.metrics import model_training_flops

    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    c = model.config
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    n_lora = sum(p.numel() for p in lora_parameters(model))
    batch = make_batch(random_docs([3, 5], c.vocab_size))
    head_dim = c.hidden_size // c.num_attention_heads
    expected = (4 * n_matmul + 6 * n_lora) * 8 + 6 * c.num_attention_heads * head_dim * c.num_hidden_layers * (9 + 25)
    assert model_training_flops(model, n_lora, batch.doc_lengths) == expected
