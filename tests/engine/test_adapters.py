"""Several named adapters on one model (lorafuse.load_adapters) and `lorafuse eval` with several --adapter:
the model loaded once, the adapters swapped, each giving what it gives alone."""

import json
import random

import pytest
import torch

import lorafuse
from lorafuse.engine.adapters import adapter_names
from lorafuse.engine.cli import main
from lorafuse.engine.config import LoraConfig
from lorafuse.engine.demo.tickets import make_example
from lorafuse.engine.evaluate import evaluate
from lorafuse.engine.lora import inject_lora, load_adapter, lora_modules, save_adapter
from lorafuse.engine.model import load_model

from engine_utils import write_jsonl

pytestmark = pytest.mark.usefixtures("reference_kernels")
CPU = torch.device("cpu")


def make_adapter(model_dir, out, seed, **lora):
    """An adapter with random (non-zero) weights, as if trained."""
    model = load_model(model_dir, torch.float32, CPU)
    cfg = LoraConfig(**lora)
    inject_lora(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=generator) * 0.2)
    save_adapter(model, cfg, out, str(model_dir))
    return out


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"tickets": make_adapter(tiny_model_dir, root / "tickets", 1, r=4, alpha=8),
            "qv": make_adapter(tiny_model_dir, root / "qv", 2, r=2, alpha=8, target_modules=["q_proj", "v_proj"])}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_switching_named_adapters_gives_each_one_alone(tiny_model_dir, two_adapters):
    ids = torch.randint(0, 300, (2, 17))
    alone = {}
    for name, path in two_adapters.items():
        model = load_model(tiny_model_dir, torch.float32, CPU)
        load_adapter(model, path)
        alone[name] = logits(model, ids)
    plain = logits(load_model(tiny_model_dir, torch.float32, CPU), ids)

    model = load_model(tiny_model_dir, torch.float32, CPU)
    adapters = lorafuse.load_adapters(model, two_adapters)
    assert adapters.names == ["tickets", "qv"] and adapters.active is None
    torch.testing.assert_close(logits(model, ids), plain, rtol=0, atol=0)  # loaded, none active: the base
    for name in ["tickets", "qv", "tickets", None, "qv"]:
        adapters.use(name)
        torch.testing.assert_close(logits(model, ids), plain if name is None else alone[name], rtol=1e-6, atol=1e-6)
    with adapters.using("tickets"):
        torch.testing.assert_close(logits(model, ids), alone["tickets"], rtol=1e-6, atol=1e-6)
    assert adapters.active == "qv"
    with pytest.raises(KeyError, match="no adapter named 'sql'; loaded: tickets, qv"):
        adapters.use("sql")
    with pytest.raises(ValueError, match="already taken"):
        adapters.add("qv", two_adapters["qv"])
    assert isinstance(adapters, lorafuse.Adapters)


def test_an_adapter_of_another_base_is_refused(tiny_model_dir, two_adapters, tmp_path):
    from lorafuse.engine.demo.base_model import build_model, tiny_config

    other = tmp_path / "other"
    build_model(tiny_config("llama", vocab_size=300, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=48), other)
    model = load_model(other, torch.float32, CPU)
    with pytest.raises(ValueError, match=r"has A \(4, 96\), B \(64, 4\); the model's projection is 48 -> 32"):
        lorafuse.load_adapters(model, {"tickets": two_adapters["tickets"]})
    assert not lora_modules(model)  # refused before anything changed


def test_adapter_names_are_short_and_distinct():
    assert adapter_names(["runs/a", "runs/b"]) == ["a", "b"]
    assert adapter_names(["runs/x/best", "runs/y/best"]) == ["x/best", "y/best"]


def test_eval_with_several_adapters_is_one_table(tmp_path, tiny_model_dir, two_adapters, capsys):
    rng = random.Random(5)
    test = write_jsonl(tmp_path / "test.jsonl", [make_example(c, rng) for c in ["billing", "refund", "privacy"] * 2])
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(test), "--generate", "--max-new-tokens", "3",
            "--json", str(out)]
    for path in two_adapters.values():
        args += ["--adapter", str(path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "loss (target tokens)" in printed and "exact match" in printed
    result = json.loads(out.read_text())
    assert list(result["systems"]) == ["base", "tickets", "qv"]
    for name, path in two_adapters.items():
        alone = evaluate(str(tiny_model_dir), str(test), str(path), log=lambda *a: None)
        assert result["systems"][name]["loss"] == pytest.approx(alone["loss"], rel=1e-6)
        assert result["systems"][name]["adapter"] == str(path)
    base = evaluate(str(tiny_model_dir), str(test), log=lambda *a: None)
    assert result["systems"]["base"]["loss"] == pytest.approx(base["loss"], rel=1e-6)
    assert len(result["answers"]["qv"]) == 6
