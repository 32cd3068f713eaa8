"""Every supported family against HF's own implementation and PEFT: tiny random configs with what makes
each family differ (GQA, odd sizes, Gemma's head dim 256, (1 + w) norms, sandwich norms, GeGLU, logit
softcapping, sliding windows shorter than some documents, Gemma 3's local and global RoPE, Phi-3's fused
projections). Our packed forward over several documents equals HF's loss over the same documents run one
by one, and with a random nonzero adapter PEFT's loss and LoRA gradients."""

import numpy as np
import peft
import pytest
import torch

from lorafuse.engine.config import LoraConfig
from lorafuse.engine.data import Document
from lorafuse.engine.demo.base_model import build_model, tiny_config
from lorafuse.engine.forward import packed_loss
from lorafuse.engine.lora import inject_lora, lora_modules, lora_parameters, resolve_targets
from lorafuse.engine.model import SUPPORTED, load_model
from lorafuse.engine.packing import make_batch
from lorafuse.engine.prepare import prepare_model

pytestmark = pytest.mark.usefixtures("reference_kernels")
WINDOW = 8  # shorter than most documents below

FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {"head_dim": 24},
    "gemma": {"head_dim": 256, "hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {"head_dim": 32, "sliding_window": WINDOW, "attn_logit_softcapping": 5.0,
               "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 24},
    "gemma3_text": {"head_dim": 32, "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"],
                    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                    "query_pre_attn_scalar": 40},
    "phi3": {"sliding_window": WINDOW},
}
LENGTHS = [7, 1, 23, 12, 17]


def build(tmp_path, model_type):
    config = tiny_config(model_type, vocab_size=300, hidden=64, heads=4, kv_heads=2, intermediate=96,
                         **FAMILIES[model_type])
    build_model(config, tmp_path, seed=1)
    return load_model(tmp_path, torch.float32, torch.device("cpu"))


def random_docs(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [Document(rng.integers(3, vocab, n), rng.random(n) < 0.7) for n in LENGTHS]


def hf_loss_sum(model, docs):
    """HF's loss summed over the documents' targets, one document at a time (HF shifts labels itself)."""
    total = 0.0
    for doc in docs:
        ids = torch.from_numpy(doc.input_ids)[None]
        labels = torch.where(torch.from_numpy(doc.trained), ids, torch.full_like(ids, -100))
        labels[0, 0] = -100
        n = int((labels[0, 1:] != -100).sum())
        if n:
            total = total + model(input_ids=ids, labels=labels, use_cache=False).loss * n
    return total


def test_every_family_of_the_table_is_tested():
    assert set(FAMILIES) == set(SUPPORTED)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_packed_forward_equals_hf_document_by_document(tmp_path, model_type):
    model = build(tmp_path, model_type)
    docs = random_docs(300)
    ours = packed_loss(prepare_model(model), make_batch(docs), reduction="sum")
    reference = hf_loss_sum(model, docs)
    assert abs(ours.item() - reference.item()) <= 1e-5 * abs(reference.item())


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_lora_loss_and_gradients_equal_peft(tmp_path, model_type):
    model = build(tmp_path, model_type)
    torch.manual_seed(3)
    inject_lora(model, LoraConfig(r=4, alpha=8))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    docs = random_docs(300, seed=2)
    ours = packed_loss(prepare_model(model), make_batch(docs), reduction="sum")
    ours_grads = dict(zip(lora_modules(model), torch.autograd.grad(ours, lora_parameters(model))[0::2]))

    stock = load_model(tmp_path, torch.float32, torch.device("cpu"))
    targets = resolve_targets(model_type, LoraConfig().target_modules)
    peft_model = peft.get_peft_model(stock, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules=targets))
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(module.lora_A)
            layer.lora_B["default"].weight.copy_(module.lora_B)
    reference = hf_loss_sum(peft_model, docs)
    assert abs(ours.item() - reference.item()) <= 1e-5 * abs(reference.item())
    reference.backward()
    for name, grad in ours_grads.items():
        expected = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight.grad
        assert (grad - expected).norm() <= 1e-4 * expected.norm() + 1e-9, name


def test_phi3_adapters_use_phi3_names_and_fused_projections(tmp_path):
    model = build(tmp_path, "phi3")
    names = inject_lora(model, LoraConfig(r=2))
    assert {n.rsplit(".", 1)[-1] for n in names} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    with pytest.raises(ValueError, match="target all of them or qkv_proj"):
        resolve_targets("phi3", ["q_proj", "v_proj"])
