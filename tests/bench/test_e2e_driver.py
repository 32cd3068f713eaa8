"""The end-to-end benchmark's run (bench/harness/e2e_driver.py): one case failing loses none of the others."""

import torch

from e2e_hf_runner import HFRunner
from e2e_lorafuse_runner import LorafuseRunner
from harness_utils import HF_KEYS, TINY, load_script

e2e = load_script("e2e")


def test_a_failing_case_is_recorded_and_the_others_still_run(tmp_path, cpu_bench, monkeypatch):
    real_set_mode = LorafuseRunner.set_mode

    def set_mode(self, mode):
        if mode == "offload":
            raise RuntimeError("no arena today")
        real_set_mode(self, mode)

    def build_stock(self, settings, case):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(LorafuseRunner, "set_mode", set_mode)
    monkeypatch.setattr(HFRunner, "__init__", build_stock)
    results = e2e.main([*TINY, "--warmup", "0", "--steps", "1", "--systems", "stock", "lorafuse-recompute",
                        "lorafuse-offload", "--out", str(tmp_path / "e2e.json")])
    rows = {r["case"]: r for r in results["e2e"]}
    assert rows["stock"]["oom"] is True and "building" in rows["stock"]["note"]
    assert rows["lorafuse-offload"]["error"].startswith("RuntimeError: no arena today")
    assert rows["lorafuse-recompute"]["tokens_per_s"] > 0 and len(rows["lorafuse-recompute"]["step_losses"]) == 1
    contexts = {r["case"]: r for r in results["max_context"]}
    assert contexts["lorafuse-recompute"]["largest_tokens"] == 256
    assert contexts["lorafuse-offload"]["limited_by"] == "error"
    for row in results["e2e"]:
        assert all(key in row for key in HF_KEYS)
