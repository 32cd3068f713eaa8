"""Nothing lost, nothing silently wrong: divergence, collapse, reused output directories, resume
checks, interruption and crashes at any point."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorafuse.engine.train as train_module
from lorafuse.engine.evaluate import evaluate_loss
from lorafuse.engine.faults import CRASH_EXIT_CODE
from lorafuse.engine.lora import load_adapter
from lorafuse.engine.metrics import read_metrics
from lorafuse.engine.model import load_model
from lorafuse.engine.packing import pack
from lorafuse.engine.prepare import prepare_model
from lorafuse.engine.train import TrainingStopped, train
from lorafuse.engine.train_checkpoints import RunMismatch, read_trainer_state

from engine_utils import QUIET, tiny_train_config, write_ticket_files

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture
def files(tmp_path):
    return write_ticket_files(tmp_path)


def adapter_loss(model_dir, adapter_dir, docs_path, tokenizer) -> float:
    from lorafuse.engine.data import encode_all, read_jsonl

    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    load_adapter(model, adapter_dir)
    docs, _ = encode_all(tokenizer, read_jsonl(docs_path)[0], 256, "truncate", "assistant", str(docs_path))
    return evaluate_loss(prepare_model(model), pack(docs, 640))["loss"]


def tree_bytes(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Divergence and collapse
# ---------------------------------------------------------------------------------------------


def test_divergence_keeps_the_last_finite_state_and_resume_with_a_lower_lr_continues(
        tiny_model_dir, tiny_tokenizer, files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainingStopped, match=r"step 2: the LoRA weights after the previous update are not finite.*"
                                              r"last good step is in .*checkpoint-0"):
        train(tiny_train_config(tiny_model_dir, files, out, lr=1e20), log=QUIET)
    assert not (out / "adapter_model.safetensors").exists()
    kept = load_file(str(out / "checkpoint-0" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert math.isfinite(adapter_loss(tiny_model_dir, out / "checkpoint-0", files["validation"], tiny_tokenizer))
    assert read_metrics(out / "metrics.jsonl")[-1]["stopped"] == "non-finite"

    resumed = train(tiny_train_config(tiny_model_dir, files, out, lr=2e-3), resume=True, log=QUIET)
    assert resumed.steps == 14 and all(math.isfinite(x) for x in resumed.train_losses)
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter_model.safetensors")).values())


def test_a_bad_last_update_is_caught_too(tiny_model_dir, files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainingStopped, match="step 1: the final update made the adapter evaluate non-finite"):
        train(tiny_train_config(tiny_model_dir, {"train": files["train"]}, out, lr=1e20, max_steps=1), log=QUIET)
    assert not (out / "adapter_model.safetensors").exists() and (out / "checkpoint-0").is_dir()


def test_a_non_finite_validation_loss_stops_the_run(tiny_model_dir, files, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "evaluate_loss",
                        lambda *a, **k: {"loss": float("nan"), "ppl": float("nan"), "target_tokens": 1})
    with pytest.raises(TrainingStopped, match="step 2: the validation loss is not finite.*checkpoint-1"):
        train(tiny_train_config(tiny_model_dir, files, tmp_path / "out", eval_every=2), log=QUIET)


def test_collapse_to_a_uniform_prediction_stops_the_run(tiny_model_dir, files, tmp_path):
    with pytest.raises(TrainingStopped, match=r"training collapsed: the loss has been ln\(vocab\).*lower train.lr"):
        train(tiny_train_config(tiny_model_dir, {"train": files["train"]}, tmp_path / "out", lr=1e6, epochs=3),
              log=QUIET)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Output directories and resume checks
# ---------------------------------------------------------------------------------------------


def test_another_runs_directory_is_refused_untouched_then_replaced_with_overwrite(tiny_model_dir, files, tmp_path):
    out = tmp_path / "out"
    train(tiny_train_config(tiny_model_dir, {"train": files["train"]}, out, max_steps=2), log=QUIET)
    (out / "my_notes.txt").write_text("not lorafuse's")
    before = tree_bytes(out)
    with pytest.raises(RunMismatch, match="holds another run"):
        train(tiny_train_config(tiny_model_dir, {"train": files["train"]}, out, max_steps=3), log=QUIET)
    assert tree_bytes(out) == before
    result = train(tiny_train_config(tiny_model_dir, {"train": files["train"]}, out, max_steps=3), overwrite=True,
                   log=QUIET)
    assert result.steps == 3 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "my_notes.txt").read_text() == "not lorafuse's"


def test_bad_data_or_model_writes_nothing_and_the_model_is_checked_before_the_data(tiny_model_dir, files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        train(tiny_train_config(tiny_model_dir, {"train": bad}, out), log=QUIET)
    assert not out.exists()
    for model, message in [(tmp_path / "typo", "model directory not found"), ("", "no model directory given")]:
        with pytest.raises(ValueError, match=message):  # the data is bad too: the model is named first
            train(tiny_train_config(model, {"train": bad}, out), log=QUIET)
    assert not out.exists()


def test_resume_refuses_a_checkpoint_of_other_data_unless_forced(tiny_model_dir, files, tmp_path):
    out = tmp_path / "out"
    train(tiny_train_config(tiny_model_dir, {"train": files["train"]}, out, max_steps=4, save_every=2), log=QUIET)
    (tmp_path / "other").mkdir()
    other = write_ticket_files(tmp_path / "other", seed=7)
    with pytest.raises(RunMismatch, match=r"checkpoint-2 is of another run: data_files.train: .* --force"):
        train(tiny_train_config(tiny_model_dir, {"train": other["train"]}, out, max_steps=4), resume=True, log=QUIET)
    logs = []
    result = train(tiny_train_config(tiny_model_dir, {"train": other["train"]}, out, max_steps=4), resume=True,
                   force=True, log=logs.append)
    assert result.steps == 4 and any("--force: resuming" in line and "data_files.train" in line for line in logs)


def test_resume_remembers_best_and_patience_and_lists_each_step_once(tiny_model_dir, files, tmp_path, monkeypatch):
    """Validation loss by step, so a redone step sees the same number: 2.0, then 1.5 (the best), then worse."""
    by_step = {1: 2.0, 2: 1.5, 3: 1.7, 4: 1.8, 5: 1.9, 6: 2.0, 7: 2.1}
    current = {}
    real_step = train_module.train_step

    def step_then_maybe_die(*args, **kwargs):
        done = real_step(*args, **kwargs)
        current["step"] = kwargs["step"] + 1
        if current["step"] == current.get("die_at"):
            raise KeyboardInterrupt("killed")  # after step 5's update: its records are never written
        return done

    monkeypatch.setattr(train_module, "train_step", step_then_maybe_die)
    monkeypatch.setattr(train_module, "evaluate_loss",
                        lambda *a, **k: {"loss": by_step[current["step"]], "ppl": 1.0, "target_tokens": 1})
    cfg = lambda out: tiny_train_config(tiny_model_dir, files, out, eval_every=1, early_stopping_patience=3,  # noqa: E731
                                        save_every=3, epochs=3)
    straight = train(cfg(tmp_path / "straight"), log=QUIET)
    assert straight.stopped_early and straight.steps == 5

    current["die_at"] = 5
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "killed"), log=QUIET)
    state = read_trainer_state(tmp_path / "killed" / "checkpoint-3")
    assert (state.best_val_loss, state.bad_evals) == (1.5, 1)
    current.pop("die_at")
    resumed = train(cfg(tmp_path / "killed"), resume=True, log=QUIET)
    assert resumed.stopped_early and resumed.steps == 5  # patience counted across the resume
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "killed" / "metrics.jsonl")) == strip(
        read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    a = load_file(str(tmp_path / "straight" / "best" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "best" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 2's adapter, not overwritten after the resume


# ---------------------------------------------------------------------------------------------
# Interruption and crashes, in a real process
# ---------------------------------------------------------------------------------------------


def write_config(tmp_path, model_dir, files, out, **train):
    cfg = {"model": str(model_dir), "output_dir": str(out), "data": {"train": str(files["train"])},
           "lora": {"r": 4, "alpha": 8},
           "train": {"lr": 2e-3, "warmup_steps": 1, "max_tokens_per_step": 640, "max_seq_len": 256,
                     "eval_every": 0, "save_every": 0, "progress": False, "log_every": 1, **train}}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args, env=None, **kwargs):
    env = {**os.environ, "TRITON_INTERPRET": "0", "LORAFUSE_KERNELS": "reference", "PYTHONSAFEPATH": "1",
           **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "lorafuse.engine.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_model_dir, files, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, tiny_model_dir, files, out, epochs=50)
    proc = cli("train", str(config), "train.seed=0")
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert f"continue with: lorafuse train {config} train.seed=0 --resume" in stderr
    step = int(stderr.split("interrupted after step ")[1].split(";")[0])
    assert (out / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    assert read_trainer_state(out / f"checkpoint-{step}").step == step


@pytest.mark.slow
def test_crashes_at_random_points_resume_to_the_same_adapter(tiny_model_dir, files, tmp_path):
    """Killed (os._exit, no cleanup) after steps, inside checkpoint writes and inside adapter writes, again
    and again: every resumed run ends with the adapter of the uninterrupted run, and every checkpoint on
    disk is whole at every moment we look."""
    straight = tmp_path / "straight"
    proc = cli("train", str(write_config(tmp_path, tiny_model_dir, files, straight, max_steps=8, save_every=1)))
    assert proc.wait(timeout=300) == 0, proc.communicate()[1]

    crashed = tmp_path / "crashed"
    config = write_config(tmp_path, tiny_model_dir, files, crashed, max_steps=8, save_every=1)
    rng = random.Random(0)
    crashes = 0
    for _ in range(12):
        point = rng.choice(["step:2", "step:3", "checkpoint:1", "checkpoint:2", "adapter:1", "adapter:2"])
        args = ["train", str(config)] + (["--resume"] if crashed.exists() else [])
        proc = cli(*args, env={"LORAFUSE_CRASH_AT": point})
        rc = proc.wait(timeout=300)
        assert rc in (0, CRASH_EXIT_CODE), proc.communicate()[1]
        for ckpt in sorted(crashed.glob("checkpoint-*")):
            assert read_trainer_state(ckpt) is not None, ckpt
            load_file(str(ckpt / "adapter_model.safetensors"))
            torch.load(ckpt / "optimizer.pt", weights_only=True)
        if rc == 0:
            break
        crashes += 1
    assert crashes >= 3 and rc == 0, (crashes, rc)
    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter_model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    assert [r["step"] for r in read_metrics(crashed / "metrics.jsonl")] == list(range(1, 9))
    assert json.loads((crashed / "run.json").read_text())["run_id"] == read_trainer_state(
        crashed / "checkpoint-7").run_id


def test_checkpoints_saved_after_the_bad_update_are_removed(tiny_model_dir, files, tmp_path):
    """A huge but finite update shows only at the next step, after checkpoint-1 was written from it: that
    checkpoint goes, so --resume finds the restored one."""
    out = tmp_path / "out"
    with pytest.raises(TrainingStopped, match=r"checkpoint-0 \(removed checkpoint-1: saved after the update"):
        train(tiny_train_config(tiny_model_dir, {"train": files["train"]}, out, lr=1e20, save_every=1), log=QUIET)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0"]
