"""QLoRA (engine/quantize.py): NF4 frozen projections quantized at load or read from a bitsandbytes directory,
training, HF's own forward and generation, eval, merge, the saved adapter in PEFT, the bytes the plan counts."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafuse.engine.config import ConfigError, load_config
from lorafuse.engine.model import ModelError, load_model
from lorafuse.engine.quantize import (
    NF4Linear,
    dequantize_workspace_bytes,
    frozen_weight_bytes,
    projection_names,
    quantize_model,
)
from lorafuse.kernels.nf4 import NF4Weight, dequantize_nf4_reference, quantize_nf4

from engine_utils import QUIET, llama_8b_dir, tiny_train_config, write_ticket_files

CPU = torch.device("cpu")
# Frozen bytes of the NF4 model over those of the same model in bfloat16; the model below is projections for
# the most part (as a 7B+ model is): 0.28x measured; NF4 alone is 0.258x (4.125 bits per value and codebooks)
MAX_RATIO = 0.30
# Loss drop (first logged step to last) of the NF4 run against the unquantized one, same seed and data
DROP_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def qlora_dir(tmp_path_factory, tiny_model_dir):
    """A small Llama whose weights are mostly projections (hidden 256, MLP 1024, 4 layers, tied embeddings), with
    the tiny model's tokenizer; q/k/v and gate/up line up in NF4 blocks, so they stack."""
    from lorafuse.engine.demo.base_model import build_model, tiny_config
    from lorafuse.engine.model import load_tokenizer

    path = tmp_path_factory.mktemp("qlora_llama")
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, path / f.name)
    tokenizer = load_tokenizer(tiny_model_dir)
    config = tiny_config("llama", vocab_size=len(tokenizer), hidden=256, layers=4, heads=4, kv_heads=2,
                         intermediate=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    build_model(config, path, seed=0)
    return path


@pytest.fixture
def ticket_files(tmp_path):
    return write_ticket_files(tmp_path)


# ----------------------------------------------------------------------------- loading


def test_load_quantizes_every_projection_and_nothing_else(qlora_dir):
    model = load_model(qlora_dir, torch.float32, CPU, quantize="nf4")
    names = projection_names(model)
    assert len(names) == 4 * 7
    assert all(isinstance(model.get_submodule(n), NF4Linear) for n in names)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, dense, float32
    assert model.model.embed_tokens.weight.dtype == torch.float32 and not model.model.embed_tokens.weight.is_meta
    # each projection: exactly what quantizing its stored weight gives
    stored = load_file(str(qlora_dir / "model.safetensors"))
    q = model.model.layers[2].mlp.down_proj.weight
    assert torch.equal(q.packed, quantize_nf4(stored["model.layers.2.mlp.down_proj.weight"]).packed)
    # and the same model quantized after a dense load is the same model
    dense = load_model(qlora_dir, torch.float32, CPU)
    quantize_model(dense)
    for (name, a), (_, b) in zip(model.named_buffers(), dense.named_buffers(), strict=True):
        assert torch.equal(a, b), name


def test_frozen_bytes_are_at_most_0_3x_of_the_bf16_model(qlora_dir, capsys):
    bf16 = frozen_weight_bytes(load_model(qlora_dir, torch.bfloat16, CPU))
    nf4 = frozen_weight_bytes(load_model(qlora_dir, torch.bfloat16, CPU, quantize="nf4"))
    ratio = nf4 / bf16
    print(f"\nfrozen weights: bf16 {bf16} bytes, nf4 {nf4} bytes: {ratio:.3f}x")
    assert ratio <= MAX_RATIO


def test_hf_forward_and_generate_run_on_the_quantized_model(qlora_dir, reference_kernels):
    model = load_model(qlora_dir, torch.float32, CPU, quantize="nf4")
    dense = load_model(qlora_dir, torch.float32, CPU)
    for name in projection_names(dense):  # the dense model with the NF4 model's weights: the same function
        dense.get_submodule(name).weight.data = dequantize_nf4_reference(model.get_submodule(name).weight)
    ids = torch.randint(3, 300, (2, 19))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-4)
        out = model.generate(ids[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out, dense.generate(ids[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_a_non_finite_weight_is_refused_naming_file_and_tensor(qlora_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(qlora_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight: 1 NaN or inf"):
        load_model(bad, torch.float32, CPU, quantize="nf4")


# ----------------------------------------------------------------------------- bitsandbytes directories


def bnb_state(w: NF4Weight, original_dtype: str) -> dict:
    """The tensors bitsandbytes' Linear4bit saves under `<module>.weight.` (QuantState.as_dict(packed=True))."""
    meta = {"quant_type": "nf4", "blocksize": 64, "dtype": original_dtype, "shape": list(w.shape),
            "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": w.offsets[0].item()}
    return {"": w.packed.reshape(-1, 1), ".absmax": w.absmax, ".quant_map": w.code, ".nested_absmax": w.nested_absmax,
            ".nested_quant_map": w.nested_code,
            ".quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


def write_bnb_dir(src, dst, quant_type="nf4", **qc):
    """`src` saved as bitsandbytes NF4 would save it: projections packed, the rest as it was."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    out = {}
    for key, tensor in state.items():
        name = key.removesuffix(".weight")
        if key.endswith("_proj.weight"):
            for suffix, t in bnb_state(quantize_nf4(tensor), "float32").items():
                out[f"{name}.weight{suffix}"] = t.contiguous()
        else:
            out[key] = tensor
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                     "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": True,
                                     "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8", **qc}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_our_bitsandbytes_layout_is_the_one_bitsandbytes_writes():
    try:
        import bitsandbytes.functional as bnb
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"bitsandbytes does not import here ({type(e).__name__})")
    w = torch.randn(64, 96)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = {"": packed, **{f".{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = bnb_state(quantize_nf4(w), "float32")
    assert set(ours) == set(theirs)
    assert json.loads(bytes(ours[".quant_state.bitsandbytes__nf4"].tolist())) == \
        json.loads(bytes(theirs[".quant_state.bitsandbytes__nf4"].tolist()))
    assert ours[""].shape == theirs[""].shape and torch.equal(ours[""], theirs[""])


def test_a_bitsandbytes_directory_loads_as_stored_and_trains(qlora_dir, tmp_path, ticket_files, reference_kernels):
    from lorafuse.engine.train import train

    bnb_dir = write_bnb_dir(qlora_dir, tmp_path / "bnb")
    model = load_model(bnb_dir, torch.float32, CPU)  # quantize: none, yet the checkpoint is NF4
    stored = load_file(str(bnb_dir / "model.safetensors"))
    q = model.model.layers[0].self_attn.k_proj.weight
    assert isinstance(q, NF4Weight)
    assert torch.equal(q.packed, stored["model.layers.0.self_attn.k_proj.weight"].reshape(-1))
    assert torch.equal(q.absmax, stored["model.layers.0.self_attn.k_proj.weight.absmax"])
    assert not hasattr(model.config, "quantization_config")
    same = load_model(qlora_dir, torch.float32, CPU, quantize="nf4")
    ids = torch.randint(3, 300, (1, 11))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, same(ids).logits)
    result = train(tiny_train_config(bnb_dir, ticket_files, tmp_path / "out", max_steps=3), log=QUIET)
    assert len(result.train_losses) == 3 and all(map(torch.isfinite, torch.tensor(result.train_losses)))


@pytest.mark.parametrize("qc,named", [({"quant_method": "gptq", "bits": 4}, "quantized with gptq"),
                                      ({"load_in_8bit": True, "load_in_4bit": False}, "8-bit"),
                                      ({"bnb_4bit_quant_type": "fp4"}, "'fp4'")])
def test_other_quantizations_are_refused_by_name(qlora_dir, tmp_path, qc, named):
    path = write_bnb_dir(qlora_dir, tmp_path / "q", **qc)
    with pytest.raises(ModelError, match=named):
        load_model(path, torch.float32, CPU)


# ----------------------------------------------------------------------------- training, eval, merge


def test_training_with_nf4_falls_like_the_unquantized_run(qlora_dir, ticket_files, tmp_path, reference_kernels):
    """Same seed and data: the loss of the NF4 run starts a little elsewhere (the base moved by 4-bit rounding)
    and falls by as much as the unquantized run's, within DROP_TOLERANCE of it. The adapter is a PEFT adapter
    that PeftModel.from_pretrained loads on the unquantized base."""
    from lorafuse.engine.metrics import read_metrics
    from lorafuse.engine.train import train

    logs = []
    runs = {}
    for quantize in ("none", "nf4"):
        cfg = tiny_train_config(qlora_dir, ticket_files, tmp_path / quantize, max_steps=10)
        cfg.quantize = quantize
        runs[quantize] = train(cfg, log=logs.append)
    dense, nf4 = runs["none"].train_losses, runs["nf4"].train_losses
    drops = {k: r.train_losses[0] - min(r.train_losses[-3:]) for k, r in runs.items()}
    print(f"\nlosses none {dense[0]:.4f} -> {dense[-1]:.4f}, nf4 {nf4[0]:.4f} -> {nf4[-1]:.4f}; drops {drops}")
    assert drops["none"] > 0.2
    assert abs(drops["nf4"] - drops["none"]) <= DROP_TOLERANCE * drops["none"]
    assert abs(nf4[0] - dense[0]) < 0.05 * dense[0]
    assert runs["nf4"].test["finetuned"]["loss"] < runs["nf4"].test["base"]["loss"]
    model_lines = [line for line in logs if line.startswith("[model]") and "nf4:" in line]
    assert model_lines and "x of float32" in model_lines[0]
    records = [r for r in read_metrics(tmp_path / "nf4" / "metrics.jsonl") if "loss" in r]
    dense_records = [r for r in read_metrics(tmp_path / "none" / "metrics.jsonl") if "loss" in r]
    assert records[0]["frozen_weight_bytes"] < 0.6 * dense_records[0]["frozen_weight_bytes"]  # float32 here

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(qlora_dir), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "nf4"))
    saved = load_file(str(tmp_path / "nf4" / "adapter_model.safetensors"))
    layer = peft.base_model.model.model.layers[3].mlp.down_proj
    key = "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
    assert torch.equal(layer.lora_B["default"].weight, saved[key])


def test_eval_and_generation_with_a_quantized_base(qlora_dir, ticket_files, tmp_path, reference_kernels):
    from lorafuse.engine.evaluate import evaluate
    from lorafuse.engine.train import train

    train(tiny_train_config(qlora_dir, ticket_files, tmp_path / "out", max_steps=2), log=QUIET)
    result = evaluate(str(qlora_dir), str(ticket_files["test"]), str(tmp_path / "out"), generate=True,
                      max_new_tokens=4, quantize="nf4", log=QUIET)
    assert 0 <= result["exact_match"] <= 1 and result["loss"] > 0


def test_merge_writes_a_plain_model_from_the_dequantized_weights(qlora_dir, ticket_files, tmp_path,
                                                                reference_kernels):
    from transformers import AutoModelForCausalLM

    from lorafuse.engine.merge import merge
    from lorafuse.engine.train import train

    cfg = tiny_train_config(qlora_dir, ticket_files, tmp_path / "adapter", max_steps=2, lr=5e-2)
    cfg.quantize, cfg.lora.target_modules = "nf4", ["q_proj", "down_proj"]
    train(cfg, log=QUIET)
    bnb_dir = write_bnb_dir(qlora_dir, tmp_path / "bnb")
    for base, quantize, out in ((qlora_dir, "nf4", "merged"), (bnb_dir, "none", "merged_bnb")):
        assert merge(base, tmp_path / "adapter", tmp_path / out, quantize=quantize) == 4 * 2
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert "quantization_config" not in config
        merged = load_file(str(tmp_path / out / "model.safetensors"))
        assert merged["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32  # dense, no NF4 pieces
        assert not any(".absmax" in k or "quant_state" in k for k in merged)
        quantized = load_model(qlora_dir, torch.float32, CPU, quantize="nf4")
        up = dequantize_nf4_reference(quantized.model.layers[0].mlp.up_proj.weight)
        assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], up)  # no adapter: the NF4 weight, dense
        adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        key = "base_model.model.model.layers.1.self_attn.q_proj"
        a, b = adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]
        q = dequantize_nf4_reference(quantized.model.layers[1].self_attn.q_proj.weight)
        assert torch.allclose(merged["model.layers.1.self_attn.q_proj.weight"], q + 2.0 * b @ a, atol=1e-6)
        AutoModelForCausalLM.from_pretrained(str(tmp_path / out))  # a normal HF directory


# ----------------------------------------------------------------------------- config, CLI, memory


def test_the_quantize_key(tmp_path):
    assert load_config(None, base={}).quantize == "none"
    assert load_config(None, base={"model": "m"}, overrides=["quantize=nf4"]).quantize == "nf4"
    with pytest.raises(ConfigError, match="'quantize' must be one of none, nf4; got 'int8'"):
        load_config(None, base={"quantize": "int8"})
    from lorafuse.engine.cli import build_parser

    parser = build_parser()
    train_help = parser._subparsers._group_actions[0].choices["train"].format_help()
    assert "quantize = none" in train_help and "NF4" in train_help
    assert parser.parse_args(["eval", "--model", "m", "--data", "d", "--quantize", "nf4"]).quantize == "nf4"
    assert parser.parse_args(["merge", "--model", "m", "--adapter", "a", "--out", "o"]).quantize == "none"


def test_the_planner_counts_nf4_bytes_and_the_dequantize_buffer(qlora_dir):
    from lorafuse.engine.activations.planner import resident_bytes

    model = load_model(qlora_dir, torch.bfloat16, CPU, quantize="nf4")
    workspace = dequantize_workspace_bytes(model, torch.bfloat16)
    assert workspace == 2 * 1024 * 256 * 2  # gate and up stacked, bf16
    assert resident_bytes(model, 64, torch.bfloat16)["weights"] == frozen_weight_bytes(model) + workspace


def test_plan_of_an_8b_model_in_nf4(tmp_path, tiny_model_dir):
    """Llama-3.1-8B's shapes from its config alone: projections in NF4, embeddings and lm_head in bf16."""
    from lorafuse.engine.plan import make_plan

    model_dir = llama_8b_dir(tiny_model_dir, tmp_path / "llama-8b")
    files = write_ticket_files(tmp_path, sizes=(("train", 60),))
    base = {"model": str(model_dir), "output_dir": str(tmp_path / "out"), "data": {"train": str(files["train"])},
            "train": {"max_tokens_per_step": 8192}}
    dense = make_plan(load_config(None, base=base), results_dir=tmp_path / "none", log=QUIET)
    nf4 = make_plan(load_config(None, base={**base, "quantize": "nf4"}), results_dir=tmp_path / "none", log=QUIET)
    assert nf4["parameters"]["frozen"] == dense["parameters"]["frozen"]
    projections = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336)
    embeddings = 2 * 128256 * 4096 * 2 + (2 * 32 + 1) * 4096 * 2  # embed, lm_head, norms: bf16
    nf4_bytes = projections // 2 + projections // 64 + 32 * 7 * 1088  # codes, 8-bit absmax, codebooks
    workspace = 2 * 14336 * 4096 * 2
    assert nf4["memory"]["weights"] == pytest.approx(embeddings + nf4_bytes + workspace, rel=1e-3)
    ratio = (embeddings + nf4_bytes) / dense["memory"]["weights"]
    print(f"\nLlama-3.1-8B frozen weights in NF4: {(embeddings + nf4_bytes) / 2**30:.2f} GiB, {ratio:.3f}x of bf16")
    assert nf4["largest_max_tokens_per_step"]["none"] > dense["largest_max_tokens_per_step"]["none"]
