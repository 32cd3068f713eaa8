"""run.json, the run manifest: config, data and model fingerprints, versions, git commit, device, and the
final metrics; the identity that resuming checks keeps working."""

import hashlib
import json
import subprocess

import pytest
import torch

import lorafuse.engine.step as step_module
from lorafuse.engine.manifest import REPO_ROOT
from lorafuse.engine.train import TrainingStopped, train
from lorafuse.engine.train_checkpoints import RunMismatch, find_resume_point, read_run_file, run_identity

from engine_utils import QUIET, tiny_train_config, write_ticket_files

pytestmark = pytest.mark.usefixtures("reference_kernels")


def test_run_json_says_what_the_run_was_and_how_it_ended(tiny_model_dir, tmp_path):
    files = write_ticket_files(tmp_path, sizes=(("train", 60), ("validation", 8), ("test", 8)))
    out = tmp_path / "out"
    cfg = tiny_train_config(tiny_model_dir, files, out, max_steps=3)
    result = train(cfg, log=QUIET)
    run = json.loads((out / "run.json").read_text())

    assert run["config"]["lora"]["r"] == 4 and run["config"]["train"]["max_steps"] == 3
    assert run["config"]["data"]["checks"]["test_leakage"] == "refuse"
    for split, path in files.items():
        entry = run["data_files"][split]
        assert entry["path"] == str(path.resolve()) and entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == run["identity"]["data_files"][split]
        assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(entry["sha256"])
    model = run["model"]
    config_file = tiny_model_dir / "config.json"
    assert model["files"]["config.json"]["sha256"] == hashlib.sha256(config_file.read_bytes()).hexdigest()
    assert model["config"] == json.loads(config_file.read_text())
    weights = model["files"]["model.safetensors"]
    assert weights["bytes"] == (tiny_model_dir / "model.safetensors").stat().st_size
    assert "mtime" in weights and "sha256" not in weights and "not hashed" in model["weights"]
    assert "sha256" in model["files"]["tokenizer.json"]
    assert run["versions"]["torch"] == torch.__version__ and run["versions"]["transformers"]
    assert run["device"]["device"] == "cpu" and run["device"]["processes"] == 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert run["git"]["commit"] == head and isinstance(run["git"]["dirty"], bool)

    final = run["final"]
    assert final["status"] == "finished" and final["steps"] == result.steps == 3
    assert final["train_loss"] == pytest.approx(result.train_losses[-1])
    assert final["best_val_loss"] == pytest.approx(result.best_val_loss)
    assert final["test"]["finetuned"]["loss"] == pytest.approx(result.test["finetuned"]["loss"])
    assert final["tokens"] > 0 and final["seconds"] > 0

    # the identity still decides what --resume accepts
    identity = run_identity(cfg)
    assert read_run_file(out)["identity"] == identity
    assert find_resume_point(out, identity, resume=True, overwrite=False, force=False, log=QUIET) is None
    cfg.lora.r = 8
    with pytest.raises(RunMismatch, match="are another run's"):
        find_resume_point(out, run_identity(cfg), resume=True, overwrite=False, force=False, log=QUIET)


def test_a_stopped_run_says_why_in_run_json(tiny_model_dir, tmp_path, monkeypatch):
    files = write_ticket_files(tmp_path, sizes=(("train", 60),))
    real_loss = step_module.packed_loss
    monkeypatch.setattr(step_module, "packed_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    out = tmp_path / "out"
    with pytest.raises(TrainingStopped):
        train(tiny_train_config(tiny_model_dir, files, out, max_steps=3), log=QUIET)
    final = read_run_file(out)["final"]
    assert final["status"] == "stopped: non-finite" and final["steps"] == 0 and final["train_loss"] is None
