"""Experiment tracking (train.report_to): the records of metrics.jsonl, also sent to TensorBoard, Weights & Biases
or MLflow. MetricsLog (metrics.py) hands every record it writes to the trackers opened here.

Each backend is an optional extra, imported only when asked for: `pip install 'lorafuse[tensorboard]'` (or
`[wandb]`, `[mlflow]`). A missing one is a ConfigError naming the extra, raised by check_trackers before any
training. Where each writes:
  tensorboard  event files in OUTPUT_DIR/tensorboard/
  wandb        a run of project $WANDB_PROJECT (default "lorafuse") named after OUTPUT_DIR, its files under
               OUTPUT_DIR/wandb/; WANDB_MODE=offline keeps it on disk (`wandb sync` uploads it later)
  mlflow       a run of experiment $MLFLOW_EXPERIMENT_NAME (default "lorafuse") on $MLFLOW_TRACKING_URI, by
               default the file store OUTPUT_DIR/mlruns/ (MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE=true, which
               is then set unless you set it)
Every numeric value of a record is logged under its metrics.jsonl key (loss, lr, grad_norm, tokens_per_s, mfu,
peak_mem_gb, val_loss, ...) at its optimizer step; the config is logged once as the run's parameters.
"""

from __future__ import annotations

import importlib
import math
import os
import time
from pathlib import Path

from .config import Config, ConfigError, to_dict


def check_trackers(names: list[str]) -> None:
    """ConfigError naming the extra to install for each tracker asked for (config.TRACKERS) that does not import."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"config key 'train.report_to' asks for {name}, which is not installed "
                              f"(pip install 'lorafuse[{name}]'): {e}") from None


def open_trackers(names: list[str], out_dir: str | Path, cfg: Config) -> list:
    """One open tracker per name (check_trackers first)."""
    opened = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
    return [opened[name](Path(out_dir), cfg) for name in dict.fromkeys(names)]


def numeric_values(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics record, but its step."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(cfg: Config) -> dict[str, str]:
    """The config as flat key.sub -> text, as trackers take run parameters."""
    out = {}
    for section, values in to_dict(cfg).items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            out[f"{section}.{key}" if key else section] = str(value)
    return out


class TensorBoardTracker:
    def __init__(self, out_dir: Path, cfg: Config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat_params(cfg).items()))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crash loses nothing, as with metrics.jsonl

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out_dir: Path, cfg: Config):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorafuse"), name=out_dir.resolve().name,
                              dir=str(out_dir), config=to_dict(cfg), reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, out_dir: Path, cfg: Config):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the file store, which MLflow 3 keeps only on request (no database or server needed)
            uri = (out_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorafuse")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=out_dir.resolve().name).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in flat_params(cfg).items()])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
