"""train.report_to: one short run sends the records of metrics.jsonl to TensorBoard, Weights & Biases (offline) and
MLflow (file store); each is read back with the backend's own reader and holds the logged values. A tracker that
is not installed is refused before anything is written, naming the extra."""

import importlib.util
import sys
from pathlib import Path

import pytest

from lorafuse.engine.config import ConfigError
from lorafuse.engine.metrics import read_metrics
from lorafuse.engine.train import train

from engine_utils import QUIET, tiny_train_config, write_ticket_files

pytestmark = pytest.mark.usefixtures("reference_kernels")
INSTALLED = [name for name in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(name) is not None]


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """One run with every installed tracker: its output directory and its metrics.jsonl records."""
    folder = tmp_path_factory.mktemp("tracked")
    files = write_ticket_files(folder, sizes=(("train", 24), ("validation", 6)))
    out = folder / "out"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.setenv("LORAFUSE_KERNELS", "reference")
        cfg = tiny_train_config(tiny_model_dir, files, out, max_steps=3, eval_every=2, report_to=INSTALLED)
        train(cfg, log=QUIET)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 3]
    return out, records


def expected(records, key):
    return [(r["step"], r[key]) for r in records if key in r]


def assert_values(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6)


def test_tensorboard_event_files_hold_the_metrics(tracked_run):
    if "tensorboard" not in INSTALLED:
        pytest.skip("tensorboard is not installed (pip install 'lorafuse[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records = tracked_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(events.Tags()["scalars"])
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        assert_values([(e.step, e.value) for e in events.Scalars(key)], expected(records, key))


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file: wandb's own Record messages in the LevelDB log
    framing wandb writes them in (7-byte file header; 32 KiB blocks; per chunk crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, pending, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        if kind == 0:
            break
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_offline_run_holds_the_metrics(tracked_run):
    if "wandb" not in INSTALLED:
        pytest.skip("wandb is not installed (pip install 'lorafuse[wandb]')")
    import json

    out, records = tracked_run
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = [(r.history.step.num, {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                     for item in r.history.item})
               for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        assert_values([(step, row[key]) for step, row in history if key in row], expected(records, key))
    (run,) = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    lora = json.loads({item.key: item.value_json for item in run.config.update}["lora"])
    assert lora.get("value", lora)["r"] == 4  # wandb may wrap a config value as {"value": ...}


def test_mlflow_file_store_run_holds_the_metrics(tracked_run):
    if "mlflow" not in INSTALLED:
        pytest.skip("mlflow is not installed (pip install 'lorafuse[mlflow]')")
    from mlflow.tracking import MlflowClient

    out, records = tracked_run
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("lorafuse").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["lora.r"] == "4"
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert_values(history, expected(records, key))


def test_a_missing_tracker_is_refused_before_anything_is_written(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    files = write_ticket_files(tmp_path, sizes=(("train", 8),))
    cfg = tiny_train_config(tiny_model_dir, files, tmp_path / "out", report_to=["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match=r"train.report_to' asks for wandb.*pip install 'lorafuse\[wandb\]'"):
        train(cfg, log=QUIET)
    assert not (tmp_path / "out").exists()


def test_unknown_tracker_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.report_to' must list some of tensorboard, wandb, mlflow"):
        tiny_train_config(tiny_model_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "out", report_to=["comet"])
