"""lorafuse.patch under transformers' Trainer and TRL's SFTTrainer: a few steps on the patched and on the unpatched
model from the same seed log the same losses (float32, relative 1e-4: the two runs sum in different orders and
the difference grows with each update), and the adapter the patched run saves loads with PeftModel.from_pretrained
and gives the outputs of the model it was trained in."""

import random

import pytest
import torch

import lorafuse
import lorafuse.engine.patch as patch_module

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("reference_kernels")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOSS_RTOL = 1e-4


def token_rows(vocab, n=16, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 24))]
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})  # a "prompt" of two untrained tokens
    return rows


def peft_model(model_dir):
    torch.manual_seed(0)  # the same initial adapters in every run
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base.config.use_cache = False  # training: HF's own forward separates flattened documents only without a cache
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS))


@pytest.fixture
def routed(monkeypatch):
    """How often the patched forwards ran lorafuse's loss and backbone."""
    counts = {"loss": 0, "backbone": 0}

    def counting(key, fn):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(patch_module, "packed_loss", counting("loss", patch_module.packed_loss))
    monkeypatch.setattr(patch_module, "packed_hidden_states", counting("backbone", patch_module.packed_hidden_states))
    return counts


def train_losses(trainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def check_saved_adapter(model, adapter_dir, model_dir):
    """The saved adapter, loaded by PEFT into a fresh base, gives the trained model's logits (HF forward)."""
    model.eval()
    fresh = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = torch.randint(3, fresh.config.vocab_size, (2, 13))
    with torch.no_grad():
        bare = fresh(input_ids=ids).logits
        loaded = peft.PeftModel.from_pretrained(fresh, str(adapter_dir))
        expected, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-5
    assert (bare - expected).abs().max() > 1e-4  # the adapter was trained


def assert_same_losses(ours, stock):
    assert len(ours) == len(stock) >= 3
    for step, (a, b) in enumerate(zip(ours, stock)):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {step + 1}: patched {a} vs unpatched {b}"


# the settings both trainers' runs share: a few steps, constant lr, logged every step, float32 on the CPU
COMMON_ARGS = {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
               "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0,
               "disable_tqdm": True}


def patched_and_unpatched(model_dir, make_trainer, check_patched) -> dict[bool, list[float]]:
    """The logged losses of the same training, unpatched and patched (check_patched(trainer, model) after it)."""
    runs = {}
    for patched in (False, True):
        model = peft_model(model_dir)
        if patched:
            lorafuse.patch(model)
        trainer = make_trainer(model, f"run-{patched}")
        runs[patched] = train_losses(trainer)
        if patched:
            check_patched(trainer, model)
    return runs


@pytest.mark.parametrize("layout", ["padded", "flattened"])
def test_hf_trainer_patched_matches_unpatched(tiny_model_dir, tiny_tokenizer, tmp_path, layout, routed):
    rows = token_rows(tiny_tokenizer.vocab_size)
    if layout == "padded":
        collator = transformers.DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)
    else:
        collator = transformers.DataCollatorWithFlattening()

    def make_trainer(model, name):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / name), gradient_accumulation_steps=2,
                                              dataloader_num_workers=0, gradient_checkpointing=layout == "flattened",
                                              **COMMON_ARGS)
        return transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)

    def check_patched(trainer, model):
        assert routed == {"loss": 8, "backbone": 0}  # 4 steps of 2 micro-batches, each on our fused loss
        # Trainer's gradient_checkpointing=True: our per-layer recompute in place of HF's
        assert (patch_module.find_patch(model.get_base_model()).checkpointer is not None) == (layout == "flattened")
        trainer.save_model(str(tmp_path / "adapter"))
        lorafuse.unpatch(model)
        check_saved_adapter(model, tmp_path / "adapter", tiny_model_dir)

    runs = patched_and_unpatched(tiny_model_dir, make_trainer, check_patched)
    assert_same_losses(runs[True], runs[False])


def test_trl_sft_trainer_padding_free_patched_matches_unpatched(tiny_model_dir, tiny_tokenizer, tmp_path, routed):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_list([{"input_ids": r["input_ids"]} for r in token_rows(tiny_tokenizer.vocab_size)])

    def make_trainer(model, name):
        args = trl.SFTConfig(output_dir=str(tmp_path / name), padding_free=True, max_length=None, bf16=False,
                             **COMMON_ARGS)
        return trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tiny_tokenizer)

    def check_patched(trainer, model):
        # SFTTrainer wraps the causal LM's forward with its own fused log-prob head, which calls the
        # backbone: ours, on every step
        assert routed == {"loss": 0, "backbone": 4}
        trainer.save_model(str(tmp_path / "sft-adapter"))
        with pytest.warns(UserWarning, match="wrapped again after lorafuse.patch"):
            lorafuse.unpatch(model)
        check_saved_adapter(model, tmp_path / "sft-adapter", tiny_model_dir)

    runs = patched_and_unpatched(tiny_model_dir, make_trainer, check_patched)
    assert_same_losses(runs[True], runs[False])
