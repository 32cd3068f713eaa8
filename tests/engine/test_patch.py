"""lorafuse.patch on HF + PEFT models: the loss and every LoRA gradient equal the unpatched model's, for
padded and padding-free batches, through the Triton kernels (the interpreter) and the reference path;
generation is unchanged; unpatch restores the model exactly; what cannot be computed is refused."""

import pytest
import torch

import lorafuse
from lorafuse.engine.demo.base_model import tiny_config
from lorafuse.engine.patch import PatchError, find_patch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 97


def tiny_peft_model(model_type="llama", layers=2, b_std=0.1, **lora):
    """A tiny float32 model (head_dim 16 keeps the interpreter quick) with PEFT LoRA on every projection,
    lora_B non-zero so the adapters matter."""
    config = tiny_config(model_type, vocab_size=VOCAB, hidden=32, layers=layers, heads=2, kv_heads=1,
                         intermediate=48, head_dim=16)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base.requires_grad_(False)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": PROJECTIONS, **lora}
    model = peft.get_peft_model(base, peft.LoraConfig(**settings))
    for name, p in model.named_parameters():
        if "lora_B" in name and b_std:
            torch.nn.init.normal_(p, std=b_std)
    return model


def docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def padded_batch(lengths, seed=0):
    """Right-padded rows, and the last row left-padded; a few labels ignored; padding labelled -100."""
    rows = docs(lengths, seed)
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if i == len(rows) - 1 else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100
    # HF would score the last padding position's prediction of a left-padded row's first token; we skip
    # padding, so that label is ignored here (right padding, what training collators use, has no such case)
    labels[-1, width - lengths[-1]] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def flattened_batch(lengths, seed=0, cu_seq_lens=False):
    """transformers' DataCollatorWithFlattening: one row, position_ids restarting per document. use_cache=False
    as training passes it: with a cache HF's own forward does not separate the documents."""
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=cu_seq_lens)
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in docs(lengths, seed)]
    batch = collate(rows, return_tensors="pt")
    assert "attention_mask" not in batch
    return {**batch, "use_cache": False}


def loss_and_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**batch).loss
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_close(ours, theirs, rel):
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    assert abs(loss.item() - ref_loss.item()) <= rel * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).norm() <= rel * r.norm() + 1e-12, ((g - r).norm() / r.norm()).item()


BATCHES = {"padded": lambda: padded_batch([9, 4, 6]), "flattened": lambda: flattened_batch([7, 1, 5]),
           "flattened_cu": lambda: flattened_batch([6, 3], cu_seq_lens=True)}


@pytest.mark.parametrize("kernels", ["triton", "reference"])
@pytest.mark.parametrize("layout", sorted(BATCHES))
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_patched_loss_and_lora_gradients_equal_peft(model_type, layout, kernels, monkeypatch):
    if kernels == "reference":
        monkeypatch.setenv("LORAFUSE_KERNELS", "reference")
    model = tiny_peft_model(model_type)
    batch = BATCHES[layout]()
    expected = loss_and_grads(model, batch)
    lorafuse.patch(model)
    launched = _launch_counts()
    out = model(**batch)
    assert out.logits is None and out.loss is not None
    assert_close(loss_and_grads(model, batch), expected, 1e-5)
    if kernels == "triton":  # the fused kernels really ran, through Triton's interpreter
        assert {"lora_linear_group", "lora_mlp", "fused_linear_cross_entropy", "varlen_attention"} <= \
            {op for op, n in _launch_counts().items() if n > launched.get(op, 0)}


def _launch_counts():
    from lorafuse.kernels._launch import launches

    return dict(launches)


def test_num_items_in_batch_divides_the_summed_loss_as_hf_does(reference_kernels):
    model = tiny_peft_model()
    batch = {**padded_batch([8, 5, 3], seed=2), "num_items_in_batch": torch.tensor(40)}
    expected = loss_and_grads(model, batch)
    lorafuse.patch(model)
    assert_close(loss_and_grads(model, batch), expected, 1e-5)


def test_call_without_labels_gives_hf_logits_over_our_backbone(reference_kernels):
    model = tiny_peft_model("qwen3")
    batch = padded_batch([7, 3, 5], seed=3)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
        lorafuse.patch(model)
        got = model(**inputs, use_cache=False).logits
    real = batch["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max() < 1e-5


def test_lora_dropout_runs_the_unfused_path_with_peft_numbers(reference_kernels):
    model = tiny_peft_model(lora_dropout=0.1)
    model.train()
    batch = flattened_batch([6, 9], seed=4)  # no padding: dropout draws the same masks in the same order
    torch.manual_seed(5)
    expected = loss_and_grads(model, batch)
    lorafuse.patch(model)
    torch.manual_seed(5)
    assert_close(loss_and_grads(model, batch), expected, 1e-5)


def test_peft_adapter_switches_are_read_on_every_call(reference_kernels):
    model = tiny_peft_model()
    batch = padded_batch([7, 5], seed=8)
    with torch.no_grad(), model.disable_adapter():
        base = model(**batch).loss
    lorafuse.patch(model)
    with torch.no_grad():
        with model.disable_adapter():
            assert abs(model(**batch).loss.item() - base.item()) <= 1e-5 * base.item()
        assert abs(model(**batch).loss.item() - base.item()) > 1e-4  # the adapter is back
    with pytest.warns(UserWarning, match="token_type_ids runs HF's forward"):
        out = model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"]))
    assert out.logits is not None  # HF's forward, which knows what to do with it (here: ignore it)


def test_generate_is_unchanged_and_unpatch_restores_the_model_exactly(reference_kernels):
    model = tiny_peft_model()
    lm = model.get_base_model()
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    rows = docs([5, 3, 6], seed=6)
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # left padding, as for generation
        ids[i, 6 - len(row):], mask[i, 6 - len(row):] = row, 1
    settings = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(**settings)

    lorafuse.patch(model)
    assert lorafuse.is_patched(model) and "forward" in vars(lm) and "forward" in vars(lm.model)
    assert torch.equal(model.generate(**settings), expected)
    q = lm.model.layers[0].self_attn
    assert q.q_proj.base_layer.weight.untyped_storage().data_ptr() == \
        q.k_proj.base_layer.weight.untyped_storage().data_ptr()  # stacked while patched
    adapter = lambda proj: proj.lora_B["default"].weight  # noqa: E731
    assert adapter(q.q_proj).untyped_storage().data_ptr() == adapter(q.v_proj).untyped_storage().data_ptr()

    lorafuse.unpatch(model)
    assert not lorafuse.is_patched(model)
    assert "forward" not in vars(lm) and "forward" not in vars(lm.model)
    assert lm.forward.__func__ is type(lm).forward and lm.model.forward.__func__ is type(lm.model).forward
    for name, p in model.named_parameters():
        original, values = before[name]
        assert p is original and torch.equal(p, values), name  # the same Parameter objects, the same values
    assert q.q_proj.base_layer.weight.untyped_storage().data_ptr() != \
        q.k_proj.base_layer.weight.untyped_storage().data_ptr()  # each weight in its own storage again
    assert q.q_proj.base_layer.weight.untyped_storage().nbytes() == q.q_proj.base_layer.weight.nbytes
    assert adapter(q.q_proj).untyped_storage().nbytes() == adapter(q.q_proj).nbytes  # the adapters too


def test_weights_replaced_after_patch_are_restacked(reference_kernels):
    model = tiny_peft_model()
    batch = padded_batch([6, 4], seed=7)
    lorafuse.patch(model)
    with torch.no_grad():
        adapted = model(**batch).loss
        model.merge_adapter(safe_merge=True)  # PEFT replaces each base weight's data by a merged copy
        assert abs(model(**batch).loss.item() - adapted.item()) < 1e-5
        model.unmerge_adapter()
        model.to(torch.float64)  # every parameter's data replaced
        ours = model(**batch).loss
        lorafuse.unpatch(model)
        theirs = model(**batch).loss
    assert ours.dtype == torch.float64  # restacked in the new dtype (HF's loss upcasts its logits to float32)
    assert abs(ours.item() - theirs.item()) <= 1e-6 * abs(theirs.item())


def test_patch_twice_is_a_no_op_and_a_plain_hf_model_patches_too(reference_kernels):
    model = tiny_peft_model()
    lorafuse.patch(model)
    state = find_patch(model.get_base_model())
    lorafuse.patch(model)
    assert find_patch(model.get_base_model()) is state
    plain = tiny_peft_model().get_base_model()  # LoRA layers without the PeftModel around them
    batch = flattened_batch([5, 4])
    expected = loss_and_grads(plain, batch)
    lorafuse.patch(plain)
    assert_close(loss_and_grads(plain, batch), expected, 1e-5)


@pytest.mark.parametrize(("settings", "message"), [
    ({"target_modules": ["q_proj", "lm_head"]}, r"lm_head has LoRA"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, r"embed_tokens has LoRA.*embeddings"),
    ({"modules_to_save": ["lm_head"]}, r"lm_head is PEFT's ModulesToSaveWrapper"),
    ({"use_dora": True}, r"q_proj adapter 'default' is a LoRA variant \(DoRA\)"),
    ({"lora_bias": True}, r"q_proj adapter 'default' has lora_bias=True"),
])
def test_what_cannot_be_computed_is_refused_naming_the_module(settings, message):
    model = tiny_peft_model(**settings)
    with pytest.raises(PatchError, match=message):
        lorafuse.patch(model)
    assert not lorafuse.is_patched(model)


def test_other_architectures_and_quantized_models_are_refused():
    gpt2 = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(PatchError, match="model_type 'gpt2' is not supported"):
        lorafuse.patch(gpt2)
    model = tiny_peft_model()
    model.get_base_model().config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(PatchError, match=r"quantized \(bitsandbytes\)"):
        lorafuse.patch(model)
