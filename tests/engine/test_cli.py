"""The lorafuse command end to end on a tiny model: data check, train, eval, merge, errors."""

import json
import random
import shutil
import subprocess
import sys

import pytest
import yaml

from lorafuse.engine.cli import main
from lorafuse.engine.demo.tickets import make_example

from engine_utils import write_jsonl

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture
def data(tmp_path):
    rng = random.Random(2)
    cats = ["billing", "refund", "privacy"]
    return {s: write_jsonl(tmp_path / f"{s}.jsonl", [make_example(cats[i % 3], rng) for i in range(n)])
            for s, n in [("train", 24), ("test", 6)]}


def test_data_check_reports_counts_and_errors(tmp_path, data, tiny_model_dir, capsys):
    assert main(["data", "check", str(data["train"]), "--model", str(tiny_model_dir), "--max-seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "24 valid examples (24 chat), 0 invalid" in out
    assert "over max_seq_len=64" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [make_example("refund", random.Random(0)), "{oops",
                                               '{"messages": [{"role": "robot", "content": "x"}]}'])
    assert main(["data", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "1 valid examples" in out and "2 invalid" in out
    assert f"{bad}:2: invalid JSON" in out and f"{bad}:3: field 'messages[0].role': unknown role 'robot'" in out


def test_train_eval_merge(tmp_path, data, tiny_model_dir, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
        "data": {"train": str(data["train"])}, "lora": {"r": 4, "alpha": 8},
        "train": {"max_tokens_per_step": 1024, "max_seq_len": 256, "save_every": 0, "progress": False}}))
    assert main(["train", str(config), "train.max_steps=3", "train.lr=1e-3"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    capsys.readouterr()

    result_json = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "out"), "--data",
                 str(data["test"]), "--generate", "--max-new-tokens", "4", "--json", str(result_json)]) == 0
    out = capsys.readouterr().out
    assert "[eval] loss" in out and "exact match" in out
    result = json.loads(result_json.read_text())
    assert result["loss"] > 0 and 0.0 <= result["exact_match"] <= 1.0

    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "out"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert main(["eval", "--model", str(tmp_path / "merged"), "--data", str(data["test"]), "--json",
                 str(tmp_path / "merged.json")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert abs(merged["loss"] - result["loss"]) < 1e-4 * result["loss"]


def test_errors_are_one_clear_line_with_exit_code_2(tmp_path, data, tiny_model_dir, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{train: {data['train']}}}\ntrain: {{lr: fast}}\n")
    assert main(["train", str(config)]) == 2
    assert "config key 'train.lr' must be float, got 'fast'" in capsys.readouterr().err

    gemma = tmp_path / "gemma"
    shutil.copytree(tiny_model_dir, gemma)
    cfg = json.loads((gemma / "config.json").read_text())
    cfg.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"])
    (gemma / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "--model", str(gemma), "--data", str(data["test"])]) == 2
    err = capsys.readouterr().err
    assert "architecture Gemma2ForCausalLM (model_type 'gemma2') is not supported" in err


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "lorafuse.engine.cli", "train", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "key.sub=value" in proc.stdout and "max_tokens_per_step" in proc.stdout


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "fine-tuned" in out
    summary = json.loads((tmp_path / "demo_results.json").read_text())
    assert 0.0 <= summary["base"]["accuracy"] <= 1.0 and 0.0 <= summary["finetuned"]["accuracy"] <= 1.0
    assert summary["finetuned"]["loss"] < summary["base"]["loss"]
    for name in ("adapter/adapter_model.safetensors", "adapter/loss.png", "data/test.jsonl", "demo_config.yaml",
                 "base-model/config.json"):
        assert (tmp_path / name).is_file(), name
