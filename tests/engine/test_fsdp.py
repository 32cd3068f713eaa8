"""train.parallel: fsdp through torchrun (gloo on CPU, float32): the frozen base and the LoRA weights sharded
over 2 and 3 ranks train exactly what one process trains; each rank holds its share of the model; a run
killed after a checkpoint resumes to the same losses, on as many ranks as before or on another number."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from lorafuse.engine.metrics import read_metrics

from engine_utils import write_ticket_files

pytestmark = pytest.mark.slow
TOKENS_PER_MICRO = 512


@pytest.fixture(scope="module")
def torchrun():
    found = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if found is None:
        pytest.skip("torchrun not found")
    return found


@pytest.fixture
def files(tmp_path):
    return write_ticket_files(tmp_path, sizes=(("train", 40), ("validation", 9)))


def config(tmp_path, model_dir, files, name, **train):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(model_dir), "output_dir": str(tmp_path / name),
        "data": {k: str(v) for k, v in files.items()}, "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 6, "lr": 2e-3, "warmup_steps": 1, "grad_accum": 1,
                  "max_tokens_per_step": TOKENS_PER_MICRO, "max_seq_len": 256, "eval_every": 3, "save_every": 1,
                  "progress": False, "log_every": 1, **train}}))
    return path


def run(torchrun, ranks, cfg, *flags, crash=None):
    env = {**os.environ, "LORAFUSE_KERNELS": "reference", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    env.pop("LORAFUSE_CRASH_AT", None)
    if crash:
        env["LORAFUSE_CRASH_AT"] = crash
    command = ([torchrun, "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]) + \
        ["-m", "lorafuse.engine.cli", "train", str(cfg), *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=cfg.parent)


def losses(out):
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(out / "metrics.jsonl")
            if "loss" in r or "val_loss" in r]


def adapter(out):
    return load_file(str(out / "adapter_model.safetensors"))


def assert_same_adapter(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= tol * a[key].abs().max() + 1e-7, key


def test_fsdp_on_two_and_three_ranks_trains_what_one_process_trains(torchrun, tiny_model_dir, files, tmp_path):
    """A step of W ranks with grad_accum g is g * W micro-batches: one process with grad_accum 6 and 2 or
    3 ranks with grad_accum 3 or 2 train the same steps."""
    one = run(torchrun, 1, config(tmp_path, tiny_model_dir, files, "one", grad_accum=6))
    assert one.returncode == 0, one.stderr[-3000:]
    for ranks, checkpointing in ((2, "none"), (3, "none"), (2, "recompute")):  # per-layer recompute inside FSDP
        name = f"fsdp{ranks}-{checkpointing}"
        proc = run(torchrun, ranks, config(tmp_path, tiny_model_dir, files, name, grad_accum=6 // ranks,
                                           parallel="fsdp", checkpointing=checkpointing))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ours, theirs = losses(tmp_path / name), losses(tmp_path / "one")
        assert [s for s, _ in ours] == [s for s, _ in theirs]
        for (_, a), (_, b) in zip(ours, theirs):
            assert abs(a - b) <= 1e-5 * abs(b), (ours, theirs)
        assert_same_adapter(adapter(tmp_path / name), adapter(tmp_path / "one"))
        held, whole = map(float, re.search(r"this rank holds ([\d.]+) MiB of the ([\d.]+) MiB", proc.stdout).groups())
        assert held <= whole / ranks * 1.1 + 0.05, (held, whole)  # about 1/ranks of the model on a rank


@pytest.mark.parametrize(("parallel", "ranks"), [("ddp", 1), ("ddp", 2), ("fsdp", 2)])
def test_killed_after_a_checkpoint_resumes_to_the_same_losses(torchrun, tiny_model_dir, files, tmp_path, parallel,
                                                              ranks):
    straight = run(torchrun, ranks, config(tmp_path, tiny_model_dir, files, "straight", parallel=parallel))
    assert straight.returncode == 0, straight.stderr[-3000:]
    cfg = config(tmp_path, tiny_model_dir, files, "killed", parallel=parallel)
    killed = run(torchrun, ranks, cfg, crash="step:4")  # after step 4's update, before its checkpoint
    assert killed.returncode != 0 and (tmp_path / "killed" / "checkpoint-3").is_dir()
    resumed = run(torchrun, ranks, cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")  # exactly, every step and evaluation
    assert_same_adapter(adapter(tmp_path / "killed"), adapter(tmp_path / "straight"), tol=0)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_sharded_run_resumes_on_another_number_of_ranks_where_it_stopped_in_the_data(
        torchrun, tiny_model_dir, files, tmp_path, before, after):
    """Steps are grouped for the ranks a run has (grad_accum x ranks micro-batches), so their losses differ;
    what must not: the micro-batches trained, in order, continue exactly where the checkpoint left them."""
    straight = run(torchrun, 1, config(tmp_path, tiny_model_dir, files, "straight", max_steps=0, eval_every=0,
                                       parallel="fsdp"))  # the whole epoch, one micro-batch a step
    assert straight.returncode == 0, straight.stderr[-3000:]
    cfg = config(tmp_path, tiny_model_dir, files, "moved", max_steps=12, eval_every=0, parallel="fsdp")
    first = run(torchrun, before, cfg, crash="step:3")
    assert first.returncode != 0
    state = json.loads((tmp_path / "moved" / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["epoch"], state["micro_in_epoch"], state["ranks"]) == (0, 2 * before, before)
    resumed = run(torchrun, after, cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"trained on {before} rank(s), now {after}" in resumed.stdout
    # micro-batch token counts in training order: the straight run's, one per step (1 rank, grad_accum 1)
    order = [r["tokens"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    moved = [r["tokens"] for r in read_metrics(tmp_path / "moved" / "metrics.jsonl") if "loss" in r]
    done = 2 * before  # micro-batches trained before the checkpoint
    assert sum(moved[:2]) == sum(order[:done])
    regrouped = [sum(order[i:i + after]) for i in range(done, len(order), after)]
    assert moved[2:] == regrouped[: len(moved) - 2]
