"""metrics.jsonl: strict JSON (non-finite numbers as null), a resumed run cuts what followed its
checkpoint; the FLOPs accounting is tested with the forward (test_forward.py)."""

import json

from lorafuse.engine.metrics import MetricsLog, read_metrics


def test_non_finite_numbers_are_written_as_null_in_strict_json(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    text = (tmp_path / "m.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda name: 1 / 0) == {"step": 1, "loss": None, "grad_norm": None,
                                                                    "lr": 1e-3}


def test_keep_lines_continues_after_the_checkpoint_and_drops_the_rest(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write({"step": step})
    assert log.lines == 5
    resumed = MetricsLog(path, keep_lines=3)
    assert resumed.lines == 3
    resumed.write({"step": 4})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert MetricsLog(path).lines == 0 and read_metrics(path) == []  # a fresh run starts an empty file
