"""The end-to-end benchmark's command (bench/e2e.py) on the CPU with a tiny model: the GPU run must work the
first time, and the comparison it makes must be fair (same weights, same adapters, same data: the same losses)."""

import json
import math

import pytest

from harness_utils import HF_KEYS, TINY, load_script

e2e = load_script("e2e")


def test_every_system_trains_the_same_steps_to_the_same_losses(tmp_path, cpu_bench):
    out = tmp_path / "e2e.json"
    results = e2e.main([*TINY, "--warmup", "1", "--steps", "2", "--out", str(out)])
    assert json.loads(out.read_text())["e2e"] == json.loads(json.dumps(results["e2e"], default=str))
    rows = {r["case"]: r for r in results["e2e"]}
    expected = {"stock", "hf_packed", "hf_patched", "lorafuse-none", "lorafuse-recompute", "lorafuse-offload"}
    assert expected <= set(rows), (rows.keys(), results.get("errors"), results["skipped"])
    if "liger" not in rows:
        assert any(s["case"] == "liger" for s in results["skipped"])
    stock = rows["stock"]
    for case, row in rows.items():
        assert not row["oom"] and "error" not in row, row
        assert len(row["step_losses"]) == 3 and all(math.isfinite(x) for x in row["step_losses"]), case
        # same base weights and same initial adapters: a fair comparison
        assert row["weights_fingerprint"] == stock["weights_fingerprint"], case
        assert row["lora_fingerprint"] == stock["lora_fingerprint"], case
        assert row["n_lora"] == row["n_lora_expected"] == stock["n_lora"], case
        # the same documents, so the first step's loss (adapters at their init) agrees tightly in float32
        assert abs(row["step_losses"][0] - stock["step_losses"][0]) <= 1e-4 * abs(stock["step_losses"][0]), case
        # and the following steps, after identical updates, still agree closely
        for ours, theirs in zip(row["step_losses"][1:], stock["step_losses"][1:]):
            assert abs(ours - theirs) <= 1e-3 * abs(theirs), case
        # CUDA-only figures are absent on the CPU
        assert row["peak_mem_gb"] is None and row["mfu"] is None
        assert all(key in row for key in HF_KEYS)
        # useful tokens: the documents' tokens, never the padding
        assert row["useful_tokens_per_step"] == [384, 384, 384]
        assert row["tokens_per_s"] == pytest.approx(384 / row["step_time_s"])
    assert stock["padding_fraction"] > 0
    assert all(p > 384 for p in stock["processed_tokens_per_step"])
    for case in ("hf_packed", "hf_patched", "lorafuse-none", "lorafuse-recompute", "lorafuse-offload"):
        assert rows[case]["padding_fraction"] == 0 and rows[case]["processed_tokens_per_step"] == [384] * 3
    assert rows["lorafuse-none"]["micro_batches_per_step"] == [1, 1, 1]
    # hf_patched: stock's padded micro-batches and step, on the same model under lorafuse.patch
    assert rows["hf_patched"]["patched"] and "patched" not in stock and "patched" not in rows["hf_packed"]
    assert rows["hf_patched"]["micro_batches_per_step"] == stock["micro_batches_per_step"]
    contexts = {r["case"]: r for r in results["max_context"]}
    assert set(contexts) == {"stock", "lorafuse-recompute", "lorafuse-offload"}
    for row in contexts.values():  # nothing runs out of memory on the CPU: the search stops at its limit
        assert row["largest_tokens"] == 256 and row["limited_by"] == "limit"
        assert [p["tokens"] for p in row["probes"]] == [64, 128, 256]


def test_qlora_cases_train_the_same_nf4_model(tmp_path, cpu_bench):
    """lorafuse on NF4 weights (quantize: nf4) and, where bitsandbytes imports, PEFT on its Linear4bit: the same
    quantized numbers, so the same first loss; both near the unquantized model's."""
    results = e2e.main([*TINY, "--warmup", "1", "--steps", "1", "--systems", "stock", "qlora-lorafuse", "qlora-peft",
                        "--max-context", "none", "--out", str(tmp_path / "e2e.json")])
    rows = {r["case"]: r for r in results["e2e"]}
    ours, stock = rows["qlora-lorafuse"], rows["stock"]
    assert "error" not in ours and ours["system"] == "lorafuse-nf4" and ours["checkpointing"] == "recompute"
    assert ours["weights_fingerprint"] == stock["weights_fingerprint"] and ours["n_frozen"] == stock["n_frozen"]
    assert ours["frozen_weight_bytes"] < stock["n_frozen"] * 4  # float32 on the CPU
    assert abs(ours["step_losses"][0] - stock["step_losses"][0]) <= 1e-3 * stock["step_losses"][0]
    if "qlora-peft" in rows:
        peft = rows["qlora-peft"]
        assert "error" not in peft, peft.get("error")
        assert abs(peft["step_losses"][0] - ours["step_losses"][0]) <= 1e-4 * ours["step_losses"][0]
    else:
        assert any(s["case"] == "qlora-peft" and "bitsandbytes" in s["reason"] for s in results["skipped"])
