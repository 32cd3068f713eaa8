"""Training checkpoints and run ownership of an output directory: identity, rotation, the checks
before a run writes anything."""

import json

import pytest
import torch

from lorafuse.engine.config import LoraConfig
from lorafuse.engine.lora import inject_lora, lora_parameters
from lorafuse.engine.model import load_model
from lorafuse.engine.train_checkpoints import (
    RunMismatch,
    TrainerState,
    check_output_dir,
    checkpoints,
    find_resume_point,
    identity_differences,
    read_trainer_state,
    run_identity,
    save_checkpoint,
)

from engine_utils import QUIET, tiny_train_config, write_ticket_files


def test_identity_names_what_differs_and_ignores_what_may_change_on_resume(tmp_path):
    files = write_ticket_files(tmp_path)
    cfg = tiny_train_config("m", files, tmp_path / "out")
    base = run_identity(cfg)
    assert identity_differences(base, run_identity(cfg)) == []
    cfg.train.lr, cfg.train.eval_every, cfg.train.max_steps = 1e-5, 3, 7  # optimisation settings: same run
    assert identity_differences(base, run_identity(cfg)) == []
    cfg.lora.r, cfg.train.seed, cfg.train.parallel = 8, 5, "fsdp"  # the number of ranks may change (resharded)
    files["train"].write_text(files["train"].read_text() + files["test"].read_text())
    diffs = identity_differences(base, run_identity(cfg))
    assert [d.split(":")[0] for d in diffs] == ["data_files.train", "lora.r", "parallel", "train.seed"]
    assert "lora.r: 4 -> 8" in diffs


def test_rotation_deletes_only_this_runs_older_checkpoints(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    inject_lora(model, LoraConfig(r=2))
    optimizer = torch.optim.AdamW(lora_parameters(model))
    cfg = tiny_train_config(tiny_model_dir, {"train": "unused"}, tmp_path)
    foreign = save_checkpoint(model, cfg, optimizer, TrainerState(step=9, run_id="other", identity={}), tmp_path)
    for step in (1, 2, 3):
        save_checkpoint(model, cfg, optimizer, TrainerState(step=step, run_id="mine", identity={}), tmp_path)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3", "checkpoint-9"]
    assert read_trainer_state(foreign).run_id == "other"


def test_output_dir_checks_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunMismatch, match="is a file"):
        check_output_dir(tmp_path / "file", resume=False, overwrite=False)
    with pytest.raises(RunMismatch, match="is a file"):
        check_output_dir(tmp_path / "file" / "out", resume=False, overwrite=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the user's own file")
    check_output_dir(run, resume=False, overwrite=False)  # not a run's file: fine
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunMismatch, match=r"holds another run \(metrics.jsonl\).*--overwrite.*--resume"):
        check_output_dir(run, resume=False, overwrite=False)
    check_output_dir(run, resume=False, overwrite=True)
    check_output_dir(run, resume=True, overwrite=False)


def test_resume_point_refuses_another_runs_checkpoint_unless_forced(tmp_path):
    files = write_ticket_files(tmp_path)
    cfg = tiny_train_config("m", files, tmp_path / "out")
    out = tmp_path / "out"
    mine = run_identity(cfg)
    logs = []
    assert find_resume_point(out, mine, resume=True, overwrite=False, force=False, log=logs.append) is None
    assert logs == [f"[train] --resume: no checkpoint in {out}; starting from step 0"]
    ckpt = out / "checkpoint-4"
    ckpt.mkdir(parents=True)
    other = json.loads(json.dumps(mine))
    other["lora"]["alpha"] = 16.0
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "run_id": "x", "identity": other}))
    with pytest.raises(RunMismatch, match=r"checkpoint-4 is of another run: lora.alpha: 16.0 -> 8.0. Pass --force"):
        find_resume_point(out, mine, resume=True, overwrite=False, force=False, log=QUIET)
    assert find_resume_point(out, mine, resume=True, overwrite=False, force=True, log=QUIET) == ckpt
    (ckpt / "trainer_state.json").write_text("not json")  # a checkpoint a crash left half-written
    older = out / "checkpoint-2"
    older.mkdir()
    (older / "trainer_state.json").write_text(json.dumps({"step": 2, "run_id": "x", "identity": mine}))
    logs = []
    assert find_resume_point(out, mine, resume=True, overwrite=False, force=False, log=logs.append) == older
    assert logs == [f"[train] --resume: {ckpt} is incomplete (no readable trainer_state.json); skipped"]
