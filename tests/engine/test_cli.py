"""The lorafuse command end to end on a tiny model: data check, train, eval, merge, errors."""

import dataclasses
import json
import random
import shutil
import subprocess
import sys
import typing

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

    falcon = tmp_path / "falcon"
    shutil.copytree(tiny_model_dir, falcon)
    cfg = json.loads((falcon / "config.json").read_text())
    cfg.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (falcon / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "--model", str(falcon), "--data", str(data["test"])]) == 2
    err = capsys.readouterr().err
    assert "architecture FalconForCausalLM (model_type 'falcon') is not supported" in err


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "lorafuse.engine.cli", "train", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "key.sub=value" in proc.stdout and "max_tokens_per_step" in proc.stdout


def test_tiny_demo_quick_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--tiny", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "fine-tuned" in out
    summary = json.loads((tmp_path / "demo_results.json").read_text())
    assert 0.0 <= summary["base"]["accuracy"] <= 1.0 and 0.0 <= summary["finetuned"]["accuracy"] <= 1.0
    assert summary["finetuned"]["loss"] < summary["base"]["loss"]
    for name in ("adapter/adapter_model.safetensors", "adapter/loss.png", "data/test.jsonl", "demo_config.yaml",
                 "base-model/config.json"):
        assert (tmp_path / name).is_file(), name


def tree_bytes(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def adapter(tmp_path, data, tiny_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "adapter"), "data": {"train": str(data["train"])},
        "lora": {"r": 4, "alpha": 8}, "train": {"max_tokens_per_step": 1024, "max_seq_len": 256, "max_steps": 2,
                                                "save_every": 0, "progress": False}}))
    assert main(["train", str(config)]) == 0
    return tmp_path / "adapter"


def test_merge_never_overwrites_the_base_model_unless_asked(tmp_path, tiny_model_dir, adapter, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = tree_bytes(base)
    for out in (base, base / "merged"):
        assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 2
        assert "would overwrite the base model (pass --overwrite" in capsys.readouterr().err
    assert tree_bytes(base) == before
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(taken)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (taken / "x").read_text() == "mine"

    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(base), "--overwrite"]) == 0
    assert tree_bytes(base) != before and (base / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".base.")]  # no temporary left behind


@pytest.mark.parametrize("case", ["output_dir is a file", "config is a directory", "adapter without r",
                                  "adapter config not JSON", "eval --json unwritable", "no model directory",
                                  "empty model path"])
def test_faults_are_one_line_naming_the_thing_not_a_traceback(case, tmp_path, data, tiny_model_dir, adapter,
                                                              capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "output_dir": str(tmp_path / "o"),
                                      "data": {"train": str(data["train"])}, "train": {"progress": False}}))
    evaluate = ["eval", "--model", str(tiny_model_dir), "--data", str(data["test"])]
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    if case == "output_dir is a file":
        (tmp_path / "o").write_text("x")
        argv, expected = ["train", str(config)], f"output_dir {tmp_path / 'o'}: {tmp_path / 'o'} is a file"
    elif case == "config is a directory":
        argv, expected = ["train", str(tmp_path)], f"{tmp_path} is a directory; expected a YAML config file"
    elif case == "adapter without r":
        raw = json.loads((broken / "adapter_config.json").read_text())
        del raw["r"]
        (broken / "adapter_config.json").write_text(json.dumps(raw))
        argv, expected = evaluate + ["--adapter", str(broken)], f"{broken / 'adapter_config.json'}: missing key(s) r"
    elif case == "adapter config not JSON":
        (broken / "adapter_config.json").write_text("{r: 4")
        argv, expected = evaluate + ["--adapter", str(broken)], f"{broken / 'adapter_config.json'}: not valid JSON"
    elif case == "eval --json unwritable":
        target = tmp_path / "missing" / "r.json"
        argv, expected = evaluate + ["--json", str(target)], f"{tmp_path / 'missing'}: its directory does not exist"
        monkeypatch.setattr("lorafuse.engine.data.encode_all", lambda *a, **k: pytest.fail("worked before checking"))
    elif case == "no model directory":
        argv, expected = ["eval", "--model", str(tmp_path / "nope"), "--data", str(data["test"])], \
            f"model directory not found: {tmp_path / 'nope'}"
    else:
        argv, expected = ["eval", "--model", "", "--data", str(data["test"])], "no model directory given"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorafuse: error: ") and expected in err and "Traceback" not in err
    assert err.count("\n") == 1, err
    monkeypatch.setenv("LORAFUSE_DEBUG", "1")  # the traceback, for whoever needs it
    with pytest.raises(Exception):  # noqa: B017 - whichever exception the message came from
        main(argv)


def test_every_option_has_help_and_train_help_lists_every_key():
    from lorafuse.engine import config as config_module
    from lorafuse.engine.cli import build_parser

    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):  # sub-commands
                parsers += action.choices.values()
            elif action.dest != "help":
                assert action.help, f"{parser.prog}: {action.dest} has no help"
    proc = subprocess.run([sys.executable, "-m", "lorafuse.engine.cli", "train", "--help"], capture_output=True,
                          text=True, timeout=120)
    keys = [line.split()[0] for line in config_module.describe_keys()]

    def leaves(obj, prefix=""):  # every key of the config tree, a list of small dataclasses by its item keys too
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
                continue
            yield prefix + f.name
            item = typing.get_args(typing.get_type_hints(type(obj))[f.name])
            if item and dataclasses.is_dataclass(item[0]):
                yield from (f"{prefix}{f.name}[].{g.name}" for g in dataclasses.fields(item[0]))

    assert sorted(keys) == sorted(leaves(config_module.Config())) and len(keys) >= 39
    assert all(f"  {key} = " in proc.stdout for key in keys)
    assert "train.lr = 0.0002" in proc.stdout and "peak learning rate" in proc.stdout


def test_one_max_seq_len_default_everywhere():
    from lorafuse.engine.cli import build_parser
    from lorafuse.engine.config import TrainConfig

    parser = build_parser()
    default = TrainConfig().max_seq_len
    assert parser.parse_args(["eval", "--model", "m", "--data", "d"]).max_seq_len == default
    assert parser.parse_args(["data", "check", "f"]).max_seq_len == default


@pytest.mark.parametrize("flags", [[], ["--tiny", "--quick"]])
def test_interrupted_demo_says_how_to_run_it_again(tmp_path, monkeypatch, capsys, flags):
    """Ctrl-C in the demo's training names the command that runs the demo again (the demo has no config file
    to resume from), not a traceback."""
    from lorafuse.engine.demo import real, run
    from lorafuse.engine.train import TrainingInterrupted

    def interrupted(out, quick=False):
        raise TrainingInterrupted(3, out / "adapter" / "checkpoint-3")

    monkeypatch.setattr(real, "run_real_demo", interrupted)
    monkeypatch.setattr(run, "run_demo", interrupted)
    assert main(["demo", "--out", str(tmp_path), *flags]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"continue with: lorafuse demo --out {tmp_path} {' '.join(flags)}".rstrip() in err
