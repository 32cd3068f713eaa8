"""LoRA adapters: PEFT-compatible files, merge, and training parity with stock HF + PEFT."""

import json

import pytest
import torch

from lorafuse.engine.config import LoraConfig, load_config
from lorafuse.engine.demo.tickets import make_example
from lorafuse.engine.lora import inject_lora, load_adapter, lora_modules, merge_lora, save_adapter
from lorafuse.engine.model import load_model

from engine_utils import write_jsonl

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("reference_kernels")
CPU = torch.device("cpu")


def trained_looking_adapter(model, cfg):
    inject_lora(model, cfg)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)


def test_peft_loads_our_adapter_and_gives_the_same_logits(tiny_model_dir, tmp_path):
    cfg = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"])
    ours = load_model(tiny_model_dir, torch.float32, CPU)
    trained_looking_adapter(ours, cfg)
    save_adapter(ours, cfg, tmp_path / "adapter", str(tiny_model_dir))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8 and saved["lora_alpha"] == 16

    base = load_model(tiny_model_dir, torch.float32, CPU)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    ids = torch.randint(3, ours.config.vocab_size, (2, 19))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
        bare = load_model(tiny_model_dir, torch.float32, CPU)(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-5
    assert (bare - expected).abs().max() > 1e-3  # the adapter changes the output


def test_load_adapter_round_trip_and_merge(tiny_model_dir, tmp_path):
    cfg = LoraConfig(r=4, alpha=4, use_rslora=True)
    ours = load_model(tiny_model_dir, torch.float32, CPU)
    trained_looking_adapter(ours, cfg)
    save_adapter(ours, cfg, tmp_path, str(tiny_model_dir))
    ids = torch.randint(3, ours.config.vocab_size, (1, 23))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        again = load_model(tiny_model_dir, torch.float32, CPU)
        assert load_adapter(again, tmp_path).use_rslora
        assert torch.equal(again(input_ids=ids).logits, expected)
        assert merge_lora(again) == 7 * again.config.num_hidden_layers
        assert not lora_modules(again)
        assert (again(input_ids=ids).logits - expected).abs().max() < 1e-5


def test_adapter_of_another_shape_is_refused(tiny_model_dir, tmp_path):
    small = load_model(tiny_model_dir, torch.float32, CPU)
    inject_lora(small, LoraConfig(r=4))
    save_adapter(small, LoraConfig(r=4), tmp_path, "x")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(load_model(tiny_model_dir, torch.float32, CPU), tmp_path)


def test_lm_head_target_is_refused_with_a_reason(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32, CPU)
    with pytest.raises(ValueError, match="lm_head is not supported"):
        inject_lora(model, LoraConfig(target_modules=["q_proj", "lm_head"]))


def pad_right(rows, value):
    width = max(len(x) for x in rows)
    return torch.stack([torch.cat([x, torch.full((width - len(x),), value)]) for x in rows])


def test_ten_training_steps_match_hf_and_peft(tiny_model_dir, tmp_path):
    """lorafuse's loop (packed, grad accumulation over 2 micro-batches) and stock HF + PEFT
    (padded batches of the same documents, HF's loss) give the same loss step by step."""
    import random

    from lorafuse.engine.data import encode_all, read_jsonl
    from lorafuse.engine.metrics import read_metrics
    from lorafuse.engine.model import load_tokenizer
    from lorafuse.engine.train import lr_at, plan_steps, train

    rng = random.Random(0)
    cats = ["billing", "refund", "privacy", "technical bug"]
    data = write_jsonl(tmp_path / "train.jsonl", [make_example(cats[i % 4], rng) for i in range(48)])
    lora = {"r": 8, "alpha": 16, "dropout": 0.0}

    # Stock side: PEFT initialises the adapter; lorafuse starts from the same weights.
    base = load_model(tiny_model_dir, torch.float32, CPU)
    peft_cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=True)
    hf = peft.get_peft_model(base, peft_cfg)
    hf.save_pretrained(str(tmp_path / "init"))

    cfg = load_config(None, base={
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "ours"), "data": {"train": str(data)},
        "lora": {**lora, "init_adapter": str(tmp_path / "init")},
        "train": {"max_steps": 10, "lr": 1e-3, "warmup_steps": 2, "grad_accum": 2, "max_tokens_per_step": 512,
                  "max_seq_len": 256, "max_grad_norm": 1.0, "eval_every": 0, "save_every": 0, "progress": False}})
    train(cfg, log=lambda *a: None)
    ours = [r["loss"] for r in read_metrics(tmp_path / "ours" / "metrics.jsonl") if "loss" in r]

    tokenizer = load_tokenizer(tiny_model_dir)
    docs, _ = encode_all(tokenizer, read_jsonl(data)[0], 256)
    steps = plan_steps(docs, cfg.train)
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0, betas=(0.9, 0.999))
    hf.train()
    stock = []
    for step, (_, micro) in enumerate(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, len(steps), cfg.train)
        docs_ids, docs_labels = [], []
        for b in micro:  # unpack the same documents into a padded batch
            for s, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):
                docs_ids.append(b.input_ids[s:e])
                shifted = torch.full((e - s,), -100)
                shifted[1:] = b.labels[s:e - 1]  # HF shifts labels itself
                docs_labels.append(shifted)
        ids, labels = pad_right(docs_ids, 0), pad_right(docs_labels, -100)
        mask = pad_right([torch.ones(len(x), dtype=torch.long) for x in docs_ids], 0)
        loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        stock.append(loss.item())

    assert len(ours) == len(stock) == 10
    for step, (a, b) in enumerate(zip(ours, stock)):
        assert abs(a - b) / abs(b) < 1e-4, f"step {step + 1}: lorafuse {a} vs HF+PEFT {b}"
    assert stock[-1] < stock[0]  # it trained


def test_a_layers_grouped_adapters_share_one_buffer(tiny_model_dir, monkeypatch):
    """inject_lora leaves each layer's q/k/v (and gate/up) adapters as adjacent rows of one buffer, so the grouped
    kernels read them in place; the values are those PEFT's initialisation gave, and each stays its own leaf."""
    from lorafuse.engine import lora as lora_engine
    from lorafuse.kernels.lora_linear import _rows

    def injected(stack: bool):
        model = load_model(tiny_model_dir, torch.float32, CPU)
        if not stack:
            monkeypatch.setattr(lora_engine, "stack_adapter_storage", lambda model: None)
        torch.manual_seed(0)
        inject_lora(model, LoraConfig(r=4, alpha=8))
        monkeypatch.undo()
        return model

    stacked, plain = injected(True), injected(False)
    for layer, other in zip(stacked.model.layers, plain.model.layers):
        for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            for attr in ("lora_A", "lora_B"):
                parts = [getattr(getattr(getattr(layer, block), n), attr) for n in names]
                assert _rows(parts).data_ptr() == parts[0].data_ptr()  # a view, not a copy
                assert all(p.is_leaf and p.requires_grad for p in parts)
                for p, n in zip(parts, names):
                    assert torch.equal(p, getattr(getattr(getattr(other, block), n), attr))
