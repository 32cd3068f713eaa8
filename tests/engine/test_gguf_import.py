"""`lorafuse import-gguf`: a tiny Llama written to a GGUF file by the test itself (as llama.cpp lays one out:
tensor names, q/k rows in its rotary order, a GPT-2-style tokenizer with the chat template) comes back as a HF
directory whose logits equal the original's; other families are refused by name."""

import json

import pytest
import torch

from lorafuse.engine.cli import main
from lorafuse.engine.gguf_import import import_gguf
from lorafuse.engine.model import ModelError

gguf = pytest.importorskip("gguf", reason="needs the gguf package (pip install 'lorafuse[demo]')")


def llama_cpp_rotary_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows as llama.cpp stores them: per head, the two rotary halves interleaved (HF keeps them apart)."""
    out, inp = weight.shape
    return weight.view(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)


def write_gguf(model_dir, path, arch: str = "llama"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_file_type(0)  # all float32
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if i in special else 1 for _, i in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    tensors = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight,
               "output.weight": model.lm_head.weight}
    for i, layer in enumerate(model.model.layers):
        for hf_name, gguf_name in names.items():
            weight = layer.get_submodule(hf_name).weight
            if hf_name == "self_attn.q_proj":
                weight = llama_cpp_rotary_order(weight, c.num_attention_heads)
            if hf_name == "self_attn.k_proj":
                weight = llama_cpp_rotary_order(weight, c.num_key_value_heads)
            tensors[f"blk.{i}.{gguf_name}.weight"] = weight
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer


def test_round_trip_logits_equal_the_original(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original, tokenizer = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    assert main(["import-gguf", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    assert "[import]" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    imported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ids = torch.randint(0, original.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, original(ids).logits, rtol=0, atol=0)

    back = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert back.chat_template == tokenizer.chat_template
    chat = [{"role": "user", "content": "My order #12345 never arrived."}, {"role": "assistant", "content": "refund"}]
    assert back.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    text = "Hello there, the blender arrived broken!"
    assert back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_other_families_and_bad_files_are_refused_by_name(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="GGUF architecture 'falcon' is not supported; lorafuse trains"):
        import_gguf(tmp_path / "falcon.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        import_gguf(tmp_path / "junk.gguf", tmp_path / "out")
    with pytest.raises(ModelError, match="GGUF file not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_directory_is_kept_unless_overwrite(tmp_path, tiny_model_dir, capsys):
    write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("mine")
    assert main(["import-gguf", str(tmp_path / "tiny.gguf"), str(taken)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (taken / "mine.txt").read_text() == "mine"
