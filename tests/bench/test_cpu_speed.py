"""bench/cpu_speed.py, the CPU path against HF + PEFT, on the tiny model: it runs, alternates the systems over
the same steps from the same weights and adapters (so the same first loss), and writes what the README cites."""

import json
import math

from harness_utils import load_script

cpu_speed = load_script("cpu_speed")


def test_cpu_speed_compares_the_same_training_and_records_it(tmp_path, cpu_bench):
    out = tmp_path / "cpu-speed.json"
    result = cpu_speed.main(["--model", "tiny", "--tokens-per-step", "256", "--warmup", "1", "--steps", "1",
                             "--doc-median", "40", "--doc-max", "96", "--peers", "stock", "hf_packed-nockpt",
                             "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    systems = result["systems"]
    assert set(systems) == {"stock", "hf_packed-nockpt", "lorafuse"}
    first = systems["stock"]["step_losses"][0]
    for name, row in systems.items():
        assert len(row["step_losses"]) == 2 and all(math.isfinite(x) for x in row["step_losses"]), name
        assert abs(row["step_losses"][0] - first) <= 1e-4 * abs(first), name
        assert row["tokens_per_s"] > 0 and len(row["step_times_s"]) == 1
    assert systems["hf_packed-nockpt"]["padding_fraction"] == 0 == systems["lorafuse"]["padding_fraction"]
    assert systems["hf_packed-nockpt"]["hf_checkpointing"] == "off"
    assert set(result["lorafuse_vs"]) == {"stock", "hf_packed-nockpt"}
    assert result["lorafuse_vs_fastest_peer"] == result["lorafuse_vs"][result["fastest_peer"]]
