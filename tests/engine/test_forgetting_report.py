"""The forgetting check (eval.general), the side-by-side HTML report and the ratings summary, on the tiny model."""

import json
import re

import pytest
import torch

from lorafuse.engine.cli import main
from lorafuse.engine.config import ConfigError, LoraConfig, load_config
from lorafuse.engine.data import DataError
from lorafuse.engine.forgetting import GeneralPrompt, forgetting_check, read_general
from lorafuse.engine.lora import inject_lora, lora_modules
from lorafuse.engine.model import load_model, load_tokenizer
from lorafuse.engine.prepare import prepare_model
from lorafuse.engine.ratings import summarise, wilson_interval
from lorafuse.engine.report_html import Row, write_report
from lorafuse.engine.train import train

from engine_utils import QUIET, write_jsonl, write_ticket_files

pytestmark = pytest.mark.usefixtures("reference_kernels")
PROMPTS = [GeneralPrompt(1, text="What is the capital of France?"), GeneralPrompt(2, text="What is 7 + 5?"),
           GeneralPrompt(3, messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Name a colour."}])]


def model_with_adapter(model_dir, scale: float):
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    prepared = prepare_model(model, stack_projections=False)
    inject_lora(model, LoraConfig(r=4, alpha=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=generator) * scale)
    return prepared


def test_an_adapter_that_changes_nothing_agrees_everywhere(tiny_model_dir, tiny_tokenizer):
    result = forgetting_check(model_with_adapter(tiny_model_dir, 0.0), tiny_tokenizer, PROMPTS, max_new_tokens=5,
                              log=QUIET)
    assert result["unchanged"] == result["prompts"] == 3 and result["agreement"] == 1.0
    assert result["token_agreement"] == result["base_token_agreement"] == 1.0
    assert result["finetuned_loss_on_base_answers"] == pytest.approx(result["base_loss_on_base_answers"], rel=1e-6)
    assert "warning" not in result
    assert [a["prompt"] for a in result["answers"]] == ["What is the capital of France?", "What is 7 + 5?",
                                                       "Name a colour."]


def test_a_disruptive_adapter_is_caught_and_the_remedies_named(tiny_model_dir, tiny_tokenizer):
    lines = []
    result = forgetting_check(model_with_adapter(tiny_model_dir, 3.0), tiny_tokenizer, PROMPTS, max_new_tokens=5,
                              max_change=0.1, log=lines.append)
    assert result["unchanged"] < 3
    assert result["token_agreement"] < 0.9 and result["base_token_agreement"] == 1.0
    assert result["finetuned_loss_on_base_answers"] > result["base_loss_on_base_answers"]
    assert "lower train.lr" in result["warning"] and "data.mix" in result["warning"]
    assert any(line.startswith("[general] warning:") for line in lines)
    assert re.search(r"word for word the same on \d of 3 general prompts; the base model's next token still its "
                     r"first choice at \d+\.\d% of their positions", lines[0])


def test_token_agreement_counts_the_models_first_choices(tiny_model_dir):
    """Teacher-forced: a position counts when the model's argmax given the reference's prefix is the
    reference's token; an answer of the model's own greedy tokens scores 1, one with a token replaced less."""
    from lorafuse.engine.forgetting import token_agreement

    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    prompt = [5, 9, 14, 3]
    greedy = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                            min_new_tokens=6)[0, len(prompt):].tolist()
    assert token_agreement(model, [prompt], [greedy]) == 1.0
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + greedy])).logits[0]
    worst = int(logits[len(prompt) + 1].argmin())  # the least likely token at the third answer position
    changed = greedy[:2] + [worst] + greedy[3:]
    assert token_agreement(model, [prompt], [changed]) < 1.0
    assert token_agreement(model, [prompt, prompt], [greedy, []]) == 1.0  # an empty answer adds no position


def test_general_prompts_file_errors_name_the_line(tmp_path):
    bad = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "ok"}, {"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match=r"g.jsonl:2: field 'messages': no user turn"):
        read_general(bad)
    with pytest.raises(DataError, match="general prompts file not found"):
        read_general(tmp_path / "none.jsonl")
    with pytest.raises(ConfigError, match="eval.general_max_change"):
        load_config(None, ["eval.general_max_change=1.5"])


def test_training_ends_with_the_forgetting_check(tmp_path, tiny_model_dir):
    files = write_ticket_files(tmp_path, sizes=(("train", 24),))
    general = write_jsonl(tmp_path / "general.jsonl", [{"prompt": p.text} for p in PROMPTS[:2]])
    cfg = load_config(None, base={
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"), "data": {"train": str(files["train"])},
        "lora": {"r": 4, "alpha": 8}, "eval": {"general": str(general), "max_new_tokens": 4},
        "train": {"max_steps": 2, "max_tokens_per_step": 1024, "max_seq_len": 256, "save_every": 0,
                  "progress": False}})
    result = train(cfg, log=QUIET)
    saved = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert saved["prompts"] == 2 == result.general["prompts"] and 0 <= saved["unchanged"] <= 2
    assert saved["answers"][0]["prompt"] == "What is the capital of France?"


def report_rows():
    return [Row("test:1", "test", "Ticket <b>one</b> & </script><script>alert(1)</script>", "billing",
                {"base": "I am a model", "a": "billing", "b": "refund"}),
            Row("test:2", "test", "Ticket two", "refund", {"base": "refund", "a": "refund", "b": "refund"}),
            Row("general:1", "general", "What is 7 + 5?", None, {"base": "12", "a": "12", "b": "13"})]


def test_report_is_self_contained_and_escapes_everything(tmp_path):
    path = write_report(tmp_path / "r.html", report_rows(), ["base", "a", "b"], title="T <x>",
                        meta={"model": "m"}, summary=[("exact match", {"base": "0%", "a": "100%"})])
    page = path.read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;b&gt;one&lt;/b&gt;" in page
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!#)", page)  # nothing loaded from anywhere
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1))
    assert data["slots"] == 6 and data["systems"] == ["base", "a", "b"] and len(data["report"]) == 16
    assert page.count('type="radio"') == 3 * 2 * 3  # three rows, two adapters, three choices
    with pytest.raises(ValueError, match="start with 'base'"):
        write_report(tmp_path / "x.html", report_rows(), ["a", "base"], title="x")


def test_wilson_interval_and_ratings_summary(tmp_path, capsys):
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0) and wilson_interval(5, 5)[1] == 1.0

    def export(rater, ratings):
        return {"format": "lorafuse-ratings", "version": 1, "report": "abc", "rater": rater,
                "ratings": [{"row": f"test:{i}", "section": "test", "system": "a", "rating": r}
                            for i, r in enumerate(ratings)]}
    first = tmp_path / "ann.json"
    first.write_text(json.dumps(export("ann", ["better"] * 6 + ["same", "worse"])))
    second = tmp_path / "bob.json"
    second.write_text(json.dumps(export("bob", ["better", "better", "worse"])))
    summary = summarise([first, second])
    s = summary["systems"]["a [test]"]
    assert (s["better"], s["same"], s["worse"], s["rated"]) == (8, 1, 2, 11)
    assert s["win_rate"] == pytest.approx(0.8) and s["win_rate_ci95"][0] == pytest.approx(0.4902, abs=1e-4)
    assert main(["eval", "--ratings", str(first), str(second), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "win rate" in out and "a [test]" in out and "80%" in out and "49% - 94%" in out
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    assert main(["eval", "--ratings", str(tmp_path / "bad.json")]) == 2
    assert "not ratings exported from a lorafuse report" in capsys.readouterr().err


def test_eval_report_and_general_on_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    files = write_ticket_files(tmp_path, sizes=(("test", 4),))
    general = write_jsonl(tmp_path / "general.jsonl", [{"prompt": p.text} for p in PROMPTS[:2]])
    report, out = tmp_path / "report.html", tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(files["test"]), "--report", str(report),
                 "--general", str(general), "--max-new-tokens", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["report"] == str(report) and "exact_match" in result["systems"]["base"]
    page = report.read_text()
    assert page.count('<tr data-row="test:') == 4 and "Held-out task examples" in page
    assert load_tokenizer(tiny_model_dir) is not None
