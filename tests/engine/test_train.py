"""The training loop: metrics, checkpoints, NaN stop with the last good adapter kept, resume,
validation and early stopping, held-out base vs fine-tuned comparison."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lorafuse.engine.step as step_module
import lorafuse.engine.train as train_module
from lorafuse.engine.metrics import read_metrics
from lorafuse.engine.train import TrainingStopped, train

from engine_utils import QUIET, tiny_train_config, write_ticket_files

pytestmark = pytest.mark.usefixtures("reference_kernels")
make_cfg = tiny_train_config


@pytest.fixture
def ticket_files(tmp_path):
    return write_ticket_files(tmp_path)


def test_train_writes_adapter_metrics_plot_and_compares_on_test(tiny_model_dir, ticket_files, tmp_path):
    cfg = make_cfg(tiny_model_dir, ticket_files, tmp_path / "out", epochs=2, eval_every=3)
    result = train(cfg, log=QUIET)
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "config.yaml",
                 "eval_results.json", "best/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == result.steps > 3
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(steps[0])
    assert {r["epoch"] for r in steps} == {0, 1}
    assert [r["step"] for r in records if "val_loss" in r] == [s for s, _ in result.val_losses]
    assert result.test["finetuned"]["loss"] < result.test["base"]["loss"]


def test_nan_loss_stops_and_keeps_the_last_good_adapter_then_resume_matches(
        tiny_model_dir, ticket_files, tmp_path, monkeypatch):
    files = {"train": ticket_files["train"]}
    straight = train(make_cfg(tiny_model_dir, files, tmp_path / "straight", max_steps=6), log=QUIET)
    assert straight.steps == 6

    real_loss, calls = step_module.packed_loss, {"n": 0}

    def loss_that_goes_nan_at_step_4(model, batch, **kw):
        calls["n"] += 1
        loss = real_loss(model, batch, **kw)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(step_module, "packed_loss", loss_that_goes_nan_at_step_4)
    out = tmp_path / "crashed"
    with pytest.raises(TrainingStopped, match=r"step 4: loss nan .* last good step is in .*checkpoint-2"):
        train(make_cfg(tiny_model_dir, files, out, max_steps=6), log=QUIET)
    assert not (out / "adapter_model.safetensors").exists()  # nothing NaN was written as the result
    kept = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert read_metrics(out / "metrics.jsonl")[-1]["stopped"] == "non-finite"

    monkeypatch.setattr(step_module, "packed_loss", real_loss)
    resumed = train(make_cfg(tiny_model_dir, files, out, max_steps=6), resume=True, log=QUIET)
    assert resumed.steps == 6
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key


def test_early_stopping_after_patience_evaluations(tiny_model_dir, ticket_files, tmp_path, monkeypatch):
    losses = iter([2.0, 1.5, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2])
    monkeypatch.setattr(train_module, "evaluate_loss",
                        lambda *a, **k: {"loss": next(losses), "ppl": 1.0, "target_tokens": 1})
    files = {k: ticket_files[k] for k in ("train", "validation")}
    result = train(make_cfg(tiny_model_dir, files, tmp_path / "o", epochs=3, eval_every=1,
                            early_stopping_patience=2), log=QUIET)
    assert result.stopped_early and result.steps == 4
    assert result.best_val_loss == 1.5
    assert (tmp_path / "o" / "best" / "adapter_model.safetensors").is_file()


def test_periodic_checkpoints_keep_only_the_newest(tiny_model_dir, ticket_files, tmp_path):
    train(make_cfg(tiny_model_dir, {"train": ticket_files["train"]}, tmp_path / "o", max_steps=7, save_every=2),
          log=QUIET)
    kept = sorted(p.name for p in (tmp_path / "o").glob("checkpoint-*"))
    assert kept == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((tmp_path / "o" / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6


def test_validation_split_carved_from_train(tiny_model_dir, ticket_files, tmp_path):
    logs = []
    cfg = make_cfg(tiny_model_dir, {"train": ticket_files["train"]}, tmp_path / "o", max_steps=2)
    cfg.data.validation_fraction = 0.25
    result = train(cfg, log=logs.append)
    assert any("validation: 10 examples carved out" in line for line in logs)
    assert result.val_losses


@pytest.mark.parametrize("setting", ["offload", "recompute"])
def test_checkpointer_modes_and_a_bounded_host_arena(tiny_model_dir, ticket_files, tmp_path, setting):
    from lorafuse.engine.activations import available_host_bytes, make_checkpointer
    from lorafuse.engine.model import load_model

    cfg = make_cfg(tiny_model_dir, ticket_files, tmp_path / "out", checkpointing=setting)
    model = load_model(cfg.model, dtype=torch.float32, device=torch.device("cpu"))
    lines = []
    ckpt = make_checkpointer(model, cfg, torch.float32, torch.device("cpu"), lines.append)
    n_layers = model.config.num_hidden_layers
    # offload: every layer but the last, whose input backward needs first
    assert ckpt.modes == ([setting] * (n_layers - 1) + ["recompute"])
    assert 0 < ckpt._max_host_bytes <= 0.5 * available_host_bytes() * 1.05  # never an unbounded pinned arena
    assert any("pinned host memory up to" in line for line in lines) == (setting == "offload"), lines
