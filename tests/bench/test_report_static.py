"""The static report's markdown and README summary (bench/harness/report_static.py) from a results file."""

import json

from report_static import END, START, write_static_report


def _variant(arch, label, regs, spill, shared, mma):
    return {"case": "llama", "arch": arch, "kernel": label.split()[0], "label": label,
            "config": {"warps": 8, "stages": 3}, "registers": regs, "stack_bytes": spill, "spill_stores": spill // 2,
            "spill_loads": spill - spill // 2, "spill_bytes": spill, "shared": shared, "ctas_per_sm": 1, "mma": mma,
            "mma_from": "sass", "ok": spill == 0}


def test_summary_names_the_spilling_kernels_before_and_after_and_is_idempotent(tmp_path):
    glu = "_lowrank_mm_kernel NUM_SEGS=1,HAS_LOWRANK=True,GLU_BWD=True,ACTIVATION=silu"
    base = {"date": "2026-12-02", "headline": "h", "command": "python -m lorafuse.kernels.aot --report",
            "environment": {}, "shared_limit": {"80": 166912, "90": 232448}}
    before = {**base, "variants": [_variant(90, glu, 255, 2260, 131072, {"wgmma m64n128k16": 5})]}
    after = {**base, "baseline": "before.json",
             "variants": [_variant(90, glu, 172, 0, 98304, {"wgmma m64n64k16": 5}),
                          {"case": "llama", "arch": 80, "kernel": "_k", "label": "_k X=1", "config": {"warps": 4,
                           "stages": 3}, "refused": "the query block must divide the key tile"}]}
    (tmp_path / "before.json").write_text(json.dumps(before))
    path = tmp_path / "static-2026-12-02.json"
    path.write_text(json.dumps(after))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{START}\nold\n{END}\ntail\n")
    write_static_report(path, readme)
    text = readme.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| LoRA GEMM dH + SwiGLU backward"))
    assert "| sm_90 | 1 | 0 | 172 | 0 | 96 | m64n64k16 | 1/1, 2260, m64n128k16 |" in row
    assert "1 variants compiled, 1 spill" in text and "old" not in text and text.endswith(f"{END}\ntail\n")
    assert "refused: the query block" in path.with_suffix(".md").read_text()
    assert write_static_report(path, readme)[-1].endswith("unchanged")
