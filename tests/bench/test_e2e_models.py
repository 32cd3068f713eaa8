"""The end-to-end benchmark's models (bench/harness/e2e_models.py): the real models' published sizes."""

import torch

from e2e_models import expected_lora_parameters, model_config


def test_model_configs_have_the_published_sizes():
    """The configs written in e2e_models.py build (on the meta device: no memory) the real models' parameter counts."""
    from transformers import AutoModelForCausalLM

    expected = {"llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512, "mistral-7b": 7_248_023_552,
                "llama-3.2-1b": 1_235_814_400}
    for name, count in expected.items():
        config = model_config(name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        assert sum(p.numel() for p in model.parameters()) == count, name
    assert expected_lora_parameters(model_config("llama-3.1-8b")) == 41_943_040  # r=16, 7 projections
    from lorafuse.engine.model import layer_window

    for name in ("qwen2.5-7b", "mistral-7b"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(name, layers=1))
        assert layer_window(model.config, 0) is None, name
