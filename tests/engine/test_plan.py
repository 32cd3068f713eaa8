"""`lorafuse plan`: steps and tokens as train packs them, padding avoided, memory per GPU (checked against
what a training step allocates), the largest token budget that fits, time and money from a recorded
benchmark or from the FLOP count."""

import json

import numpy as np
import pytest
import torch
import yaml

from lorafuse.engine.config import LoraConfig
from lorafuse.engine.data import Document
from lorafuse.engine.plan import GIB, estimate_memory, make_plan, padded_batches

from engine_utils import QUIET, llama_8b_dir, write_ticket_files

MARGIN = 0.10  # the estimate is within 10% of the allocations measured (it was within 3% when written)


def test_memory_estimate_matches_what_a_training_step_allocates(tmp_path):
    """One training step (forward, backward, AdamW with the guard's copy) of a micro Llama through the real
    Triton kernels (Triton's interpreter on the CPU, so the same tensors are allocated as on a GPU), its
    allocations recorded by torch's profiler: parameters + the step's peak, against estimate_memory."""
    from torch.profiler import ProfilerActivity, profile

    from lorafuse.engine.demo.base_model import build_model, tiny_config
    from lorafuse.engine.guard import LastGood
    from lorafuse.engine.lora import inject_lora, lora_parameters
    from lorafuse.engine.model import load_model
    from lorafuse.engine.packing import make_batch
    from lorafuse.engine.prepare import prepare_model
    from lorafuse.engine.step import train_step
    from lorafuse.kernels._launch import launches

    build_model(tiny_config("llama", vocab_size=97, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=48,
                            head_dim=16), tmp_path, seed=2)
    model = load_model(tmp_path, torch.float32, torch.device("cpu"))
    prepared = prepare_model(model)
    inject_lora(model, LoraConfig(r=4, alpha=8))
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    rng = np.random.default_rng(0)
    tokens = 192
    batch = make_batch([Document(rng.integers(3, 97, n), rng.random(n) < 0.9) for n in (96, 48, 24, 24)])
    before = dict(launches)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(prepared, [batch], optimizer, params, last_good=LastGood(params, optimizer))
    assert launches["fused_linear_cross_entropy"] > before.get("fused_linear_cross_entropy", 0)  # the kernels ran
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    measured = sum(p.numel() * p.element_size() for p in model.parameters()) + peak
    estimate = estimate_memory(model, tokens, torch.float32, "none", lora_rank=4, lora_projections=7)
    print(f"\nmemory of a step at {tokens} tokens: estimated {estimate.total} bytes, measured {measured} "
          f"({estimate.total / measured - 1:+.1%})")
    assert abs(estimate.total / measured - 1) < MARGIN


@pytest.fixture
def run_yaml(tmp_path, tiny_model_dir):
    files = write_ticket_files(tmp_path, sizes=(("train", 120), ("validation", 12)))
    cfg = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
           "data": {k: str(v) for k, v in files.items()}, "lora": {"r": 4, "alpha": 8},
           "train": {"epochs": 2, "max_tokens_per_step": 1024, "max_seq_len": 256}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_counts_what_train_would_run(run_yaml, tmp_path):
    from lorafuse.engine.config import load_config
    from lorafuse.engine.model import load_tokenizer
    from lorafuse.engine.train import load_datasets, plan_steps

    cfg = load_config(run_yaml)
    lines = []
    plan = make_plan(cfg, gpu="a100-80gb", price_per_hour=2.0, results_dir=tmp_path / "none", log=lines.append)
    steps = plan_steps(load_datasets(cfg, load_tokenizer(cfg.model), QUIET)["train"], cfg.train)
    assert plan["steps"] == len(steps) == 52 and plan["warmup_steps"] == 2  # 3% of 52, rounded up
    assert plan["tokens"] == sum(b.num_tokens for _, micro in steps for b in micro)
    assert plan["trained_tokens"] == sum(b.num_target_tokens for _, micro in steps for b in micro)
    epoch = plan["epochs"][0]
    assert epoch["padded_tokens"] > epoch["tokens"] and epoch["padded_micro_batches"] >= epoch["micro_batches"]
    memory = plan["memory"]
    assert memory["fits"] and memory["total"] == sum(memory[k] for k in ("weights", "lora", "activations",
                                                                          "loss_workspace"))
    largest = plan["largest_max_tokens_per_step"]
    assert largest["none"] <= largest["recompute"] <= largest["offload"]
    assert "no benchmark of lorafuse on A100 80GB is recorded" in plan["time"]["source"]
    assert "assumed 35% MFU of its datasheet bf16 peak of 312 TFLOP/s" in plan["time"]["source"]
    flops = sum(e["model_flops"] for e in plan["epochs"])
    assert plan["time"]["seconds"] == pytest.approx(flops / (0.35 * 312e12))
    assert plan["cost"]["total"] == pytest.approx(plan["time"]["seconds"] / 3600 * 2.0)
    assert [line.split()[1] for line in lines if line.startswith("[plan]")] == \
        ["{}".format(plan["steps"]), "tokens", "packing:", "memory", "largest", "time"]


def test_plan_uses_a_recorded_benchmark_of_the_gpu(run_yaml, tmp_path):
    from lorafuse.engine.config import load_config

    results = tmp_path / "results"
    results.mkdir()
    row = {"system": "lorafuse", "case": "lorafuse-none", "model": "some-model", "n_frozen": 100_000, "n_lora": 5000,
           "tokens_per_s": 50_000.0, "step_time_s": 0.1, "model_tflops_per_step": 0.002}
    (results / "h100-80gb-hbm3-2026-01-01.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "e2e": [row]}))
    (results / "a100-sxm4-80gb-2026-01-01.json").write_text(json.dumps(
        {"gpu": "NVIDIA A100-SXM4-80GB", "e2e": [{**row, "model_tflops_per_step": 1.0}]}))
    (results / "demo-cpu.json").write_text(json.dumps({"base": {}}))
    plan = make_plan(load_config(run_yaml), gpu="H100", results_dir=results, log=QUIET)
    assert plan["time"]["recorded"]["file"] == "h100-80gb-hbm3-2026-01-01.json"
    assert plan["time"]["model_flops_per_s_per_gpu"] == pytest.approx(0.002e12 / 0.1)
    assert plan["time"]["source"].startswith("recorded: h100-80gb-hbm3-2026-01-01.json, lorafuse-none on some-model")


def test_plan_of_an_8b_model_from_its_config_alone(run_yaml, tmp_path, tiny_model_dir):
    """Llama-3.1-8B's shapes, no weights (config and tokenizer only): bf16 weights of 8.03B parameters."""
    model_dir = llama_8b_dir(tiny_model_dir, tmp_path / "llama-8b")
    from lorafuse.engine.config import load_config

    cfg = load_config(run_yaml, [f"model={model_dir}", "lora.r=16", "train.max_tokens_per_step=8192"])
    plan = make_plan(cfg, gpu="H100", gpus=2, results_dir=tmp_path / "none", log=QUIET)
    assert plan["parameters"]["frozen"] == pytest.approx(8.03e9, rel=0.01)
    assert plan["parameters"]["lora"] == 16 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    memory = plan["memory"]
    assert memory["weights"] / GIB == pytest.approx(8.03e9 * 2 / GIB, rel=0.01)
    assert memory["lora"] == plan["parameters"]["lora"] * 28
    kept_per_token = (2 * 4096 + 2 * 4096 + 2 * 14336 + 16 * 7) * 2 + 4 * (2 + 32)  # k, v computed again
    assert memory["activations"] == 32 * 8192 * kept_per_token
    largest = plan["largest_max_tokens_per_step"]
    # keeping everything, 32 layers of kept_per_token bytes fill what the weights leave of 80 GB near 20k tokens
    assert 18_000 < largest["none"] < 24_000 < largest["recompute"] < largest["offload"]


def test_padded_batches_of_the_same_documents():
    assert padded_batches([10, 2, 2, 2], max_tokens=20, seed=0)[0] == 2  # two per batch at the longest (10)
    micro, tokens = padded_batches([4, 4, 4, 4], max_tokens=8, seed=0)
    assert (micro, tokens) == (2, 16)  # no padding when all are as long


def test_plan_command(run_yaml, tmp_path, capsys):
    from lorafuse.engine.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", str(run_yaml), "train.epochs=1", "--gpu", "L4", "--price-per-hour", "0.8",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[plan] memory per GPU at 1024 tokens per micro-batch" in text and "of the L4 24GB's 22.5 GiB" in text
    assert json.loads(out.read_text())["cost"]["price_per_gpu_hour"] == 0.8
    assert main(["plan", str(run_yaml), "--gpu", "TPU"]) == 2
    assert "--gpu TPU: unknown GPU; known: H100" in capsys.readouterr().err
