"""Warmup as a share of the run (train.warmup_ratio; train.warmup_steps wins when set) and the overfitting
warning (validation loss rising for two evaluations while the training loss falls)."""

import math

import pytest

import lorafuse.engine.train as train_module
from lorafuse.engine.config import ConfigError, TrainConfig, load_config
from lorafuse.engine.guard import OverfitWatch
from lorafuse.engine.step import StepResult
from lorafuse.engine.train import lr_at, warmup_steps

from engine_utils import tiny_train_config, write_ticket_files


@pytest.mark.parametrize("total, ratio, expected", [
    (1000, 0.03, 30), (100, 0.03, 3), (101, 0.03, 4), (10, 0.03, 1), (1, 0.03, 1), (0, 0.03, 1),
    (100, 0.0, 1), (100, 0.5, 50),
])
def test_warmup_from_the_ratio_is_at_least_one_step(total, ratio, expected):
    assert warmup_steps(total, TrainConfig(warmup_ratio=ratio)) == expected


@pytest.mark.parametrize("steps, total, expected", [(10, 1000, 10), (0, 1000, 0), (50, 20, 50)])
def test_warmup_steps_wins_when_set(steps, total, expected):
    assert warmup_steps(total, TrainConfig(warmup_steps=steps, warmup_ratio=0.5)) == expected


def test_lr_schedule_with_the_ratio_and_as_before_with_warmup_steps():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1)  # warmup_steps unset: 3% of 100 = 3 steps
    assert [lr_at(s, 100, cfg) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert lr_at(99, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 96 / 97)))
    old = TrainConfig(lr=1.0, warmup_steps=10)  # what the default used to be
    assert lr_at(0, 100, old) == pytest.approx(0.1) and lr_at(9, 100, old) == pytest.approx(1.0)
    none = TrainConfig(lr=1.0, warmup_steps=0)
    assert lr_at(0, 100, none) == pytest.approx(1.0)
    longer = TrainConfig(lr=1.0, warmup_steps=50)  # longer than the run: it never leaves warmup
    assert lr_at(19, 20, longer) == pytest.approx(20 / 50)


@pytest.mark.parametrize("override, message", [
    ("train.warmup_steps=-2", "'train.warmup_steps' must be -1 (from warmup_ratio) or more"),
    ("train.warmup_ratio=1.0", "'train.warmup_ratio' must be in [0, 1)"),
    ("train.warmup_ratio=-0.1", "'train.warmup_ratio' must be in [0, 1)"),
])
def test_bad_warmup_is_refused_by_name(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], base={"model": "m"})
    assert message in str(err.value)
    assert load_config(None, base={"model": "m"}).train.warmup_steps == -1


def test_overfit_watch_needs_two_rises_against_a_falling_training_loss():
    def feed(watch, train_losses, val):
        for loss in train_losses:
            watch.train_loss(loss)
        return watch.evaluated(val, 0, "out/best")

    w = OverfitWatch()
    assert feed(w, [3.0, 2.9], 2.0) is None
    assert feed(w, [2.5], 2.1) is None  # one rise is noise
    message = feed(w, [2.0], 2.2)
    assert "rose for two evaluations (2.0000 -> 2.1000 -> 2.2000)" in message
    assert "set train.early_stopping_patience" in message and "out/best" in message
    assert feed(w, [1.0], 2.5) is None  # said once
    flat = OverfitWatch()
    assert [feed(flat, [2.0], v) for v in (1.0, 1.1, 1.2)] == [None, None, None]  # training loss not falling
    down = OverfitWatch()
    assert [feed(down, [t], v) for t, v in ((3, 2.0), (2, 2.1), (1, 2.05))] == [None, None, None]


def test_the_run_warns_of_overfitting_and_logs_its_warmup(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                          reference_kernels):
    train_losses = iter([3.0, 2.8, 2.6, 2.4, 2.2, 2.0, 1.8, 1.6])
    val_losses = iter([2.0, 2.1, 2.3, 2.4, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(train_module, "train_step", lambda *a, **k: StepResult(next(train_losses), 1.0, True, True))
    monkeypatch.setattr(train_module, "evaluate_loss", lambda *a, **k: {"loss": next(val_losses), "ppl": 1.0})
    files = write_ticket_files(tmp_path, sizes=(("train", 60), ("validation", 8)))
    cfg = tiny_train_config(tiny_model_dir, files, tmp_path / "out", max_steps=4, eval_every=1, warmup_steps=-1)
    logs = []
    train_module.train(cfg, log=logs.append)
    assert any("4 steps" in line and "1 warmup step(s)" in line for line in logs), logs
    warnings = [line for line in capsys.readouterr().out.splitlines() if "overfitting" in line]  # beside the bar
    assert len(warnings) == 1 and warnings[0].startswith("[train] warning: the validation loss rose")
    assert "(2.0000 -> 2.1000 -> 2.3000)" in warnings[0] and "(3.0000 -> 2.8000 -> 2.6000)" in warnings[0]
