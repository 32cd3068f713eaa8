"""Data parallelism through torch.distributed: `torchrun --nproc_per_node=2` (gloo on CPU) trains
to the same adapter as one process running both ranks' micro-batches (grad_accum=2)."""

import os
import random
import shutil
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from lorafuse.engine.demo.tickets import make_example
from lorafuse.engine.metrics import read_metrics

from engine_utils import write_jsonl


def write_config(path, model_dir, data, out, grad_accum):
    path.write_text(yaml.safe_dump({
        "model": str(model_dir), "output_dir": str(out), "data": {"train": str(data["train"]),
                                                                  "validation": str(data["validation"])},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 4, "lr": 2e-3, "warmup_steps": 1, "grad_accum": grad_accum, "max_tokens_per_step": 512,
                  "max_seq_len": 256, "eval_every": 2, "save_every": 0, "progress": False}}))
    return path


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tiny_model_dir, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    rng = random.Random(3)
    cats = ["billing", "refund", "privacy", "cancellation"]
    data = {s: write_jsonl(tmp_path / f"{s}.jsonl", [make_example(cats[i % 4], rng) for i in range(n)])
            for s, n in [("train", 40), ("validation", 9)]}
    env = {**os.environ, "LORAFUSE_KERNELS": "reference", "OMP_NUM_THREADS": "1"}
    one = write_config(tmp_path / "one.yaml", tiny_model_dir, data, tmp_path / "one", grad_accum=2)
    two = write_config(tmp_path / "two.yaml", tiny_model_dir, data, tmp_path / "two", grad_accum=1)
    subprocess.run([sys.executable, "-m", "lorafuse.engine.cli", "train", str(one)], env=env, check=True,
                   capture_output=True, timeout=300, cwd=tmp_path)
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "lorafuse.engine.cli", "train",
                           str(two)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5 * a[key].abs().max() + 1e-7, key
    losses = lambda run: [(r["step"], round(r.get("loss", r.get("val_loss")), 5))
                          for r in read_metrics(tmp_path / run / "metrics.jsonl")]
    assert losses("one") == losses("two")
    assert sum("val_loss" in r for r in read_metrics(tmp_path / "two" / "metrics.jsonl")) == 2
