"""The public Python API (lorafuse/__init__.py): cheap to import, every declared name resolves, and a tool can
train, evaluate and merge through it as the CLI does."""

import json
import subprocess
import sys

import pytest

import lorafuse

from engine_utils import QUIET, write_ticket_files

pytestmark = pytest.mark.usefixtures("reference_kernels")


def test_import_lorafuse_loads_neither_torch_nor_triton():
    code = ("import sys, lorafuse; assert 'torch' not in sys.modules and 'triton' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton'))[:3]; "
            "import lorafuse._interpreter; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves():
    for name in lorafuse.__all__:
        assert getattr(lorafuse, name) is not None, name
    assert lorafuse.lora_linear is lorafuse.kernels.lora_linear
    assert set(lorafuse.__all__) <= set(dir(lorafuse))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lorafuse.nope  # noqa: B018


def test_train_evaluate_merge_through_the_api(tiny_model_dir, tmp_path):
    files = write_ticket_files(tmp_path, sizes=(("train", 24), ("test", 6)))
    config = lorafuse.load_config(None, ["train.max_steps=3", "train.progress=false", "lora.r=4"], base={
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"), "data": {"train": str(files["train"])},
        "train": {"max_tokens_per_step": 640, "max_seq_len": 256, "lr": 2e-3, "warmup_steps": 1}})
    assert isinstance(config, lorafuse.Config)
    result = lorafuse.train(config, log=QUIET)
    assert isinstance(result, lorafuse.TrainResult) and result.steps == 3 and len(result.train_losses) == 3

    scores = lorafuse.evaluate(str(tiny_model_dir), str(files["test"]), str(tmp_path / "out"), log=QUIET)
    assert scores["target_tokens"] > 0 and scores["loss"] > 0 and scores["adapter"] == str(tmp_path / "out")
    json.dumps(scores)  # what `lorafuse eval --json` writes

    n = lorafuse.merge(tiny_model_dir, tmp_path / "out", tmp_path / "merged")
    assert n == 7 * 2 and (tmp_path / "merged" / "config.json").is_file()
    merged = lorafuse.evaluate(str(tmp_path / "merged"), str(files["test"]), log=QUIET)
    assert merged["loss"] == pytest.approx(scores["loss"], rel=1e-4)
