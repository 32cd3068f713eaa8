"""The memory planner: per-layer modes from a config value, the peak-memory model, plans that fit
a budget (keep, then recompute, then offload), and activation bytes per token (computed and measured)."""

from __future__ import annotations

import logging

import pytest
import torch

from lorafuse.engine.activations import (
    estimate_peak_bytes,
    layer_modes,
    llama_layer_bytes_per_token,
    measure_bytes_per_token,
    plan_checkpointing,
)

from tiny_decoder import TinyLlamaBlock, rope_tables


def test_layer_modes_from_the_config_value():
    assert layer_modes("none", 3) == ["none"] * 3
    assert layer_modes("recompute", 2) == ["recompute"] * 2
    assert layer_modes("offload", 4) == ["offload"] * 3 + ["recompute"]
    assert layer_modes("offload", 1) == ["recompute"] and layer_modes("offload", 0) == []
    with pytest.raises(ValueError, match="must be one of"):
        layer_modes("keep", 2)


def test_peak_model_by_hand():
    # kept 10 bytes/token, input 1 byte/token, 1 token
    assert estimate_peak_bytes(["none"] * 4, 10, 1, 1) == 40
    assert estimate_peak_bytes(["recompute"] * 4, 10, 1, 1) == 3 + 11
    assert estimate_peak_bytes(["offload", "offload", "recompute", "none"], 10, 1, 1) == 12
    assert estimate_peak_bytes(["offload"] * 3 + ["recompute"], 10, 1, 1) == 12  # K + 2I
    assert estimate_peak_bytes(["recompute", "none", "none", "none"], 10, 1, 2) == 62


@pytest.mark.parametrize(("budget", "expected"), [
    (1e9, ["none"] * 4),
    (40, ["none"] * 4),
    (39, ["recompute", "none", "none", "none"]),
    (30, ["recompute", "recompute", "none", "none"]),
    (21, ["offload", "offload", "none", "none"]),
    (12, ["offload", "offload", "recompute", "none"]),
])
def test_plan_keeps_then_recomputes_then_offloads(budget, expected):
    modes = plan_checkpointing(4, 10, 1, 1, budget, min_offload_bytes=0)
    assert modes == expected
    assert estimate_peak_bytes(modes, 10, 1, 1) <= budget


def test_plan_when_nothing_fits(caplog):
    with caplog.at_level(logging.WARNING):
        modes = plan_checkpointing(4, 10, 1, 1, 5, min_offload_bytes=0)
    assert modes[-1] != "offload" and estimate_peak_bytes(modes, 10, 1, 1) == 12  # the smallest peak
    assert "more than the budget" in caplog.text
    # Inputs under min_offload_bytes are never offloaded. Keeping the top layer costs less than
    # recomputing it (its input need not be held beside its activations).
    modes = plan_checkpointing(4, 10, 1, 1, 5, min_offload_bytes=2)
    assert modes == ["recompute"] * 3 + ["none"] and estimate_peak_bytes(modes, 10, 1, 1) == 13
    assert plan_checkpointing(0, 10, 1, 1, 5) == []


def test_plan_for_llama_8b_at_32k_tokens():
    kept = llama_layer_bytes_per_token(4096, 14336, 32, 8, dtype=torch.bfloat16, lora_rank=16)
    assert kept == 2 * (2 * 4096 + 2 * 4096 + 2 * 14336 + 7 * 16) + 4 * (2 + 32)  # k, v computed again
    assert llama_layer_bytes_per_token(4096, 14336, 32, 8, dtype=torch.bfloat16, lora_rank=16, keeps_kv=True) == \
        kept + 2 * 2 * 1024
    layer_input = 4096 * 2
    tokens = 32768
    gib = 2**30
    for budget_gib in (200, 60, 20, 8, 5):
        modes = plan_checkpointing(32, kept, layer_input, tokens, budget_gib * gib)
        assert len(modes) == 32 and modes[-1] != "offload"
        assert estimate_peak_bytes(modes, kept, layer_input, tokens) <= budget_gib * gib
        order = {"offload": 0, "recompute": 1, "none": 2}
        assert [order[m] for m in modes] == sorted(order[m] for m in modes)  # offload | recompute | keep
    assert plan_checkpointing(32, kept, layer_input, tokens, 200 * gib) == ["none"] * 32
    tight = plan_checkpointing(32, kept, layer_input, tokens, 5 * gib)
    assert tight.count("offload") >= 20  # recompute alone needs 32 inputs (8 GiB) + a layer


def test_measured_bytes_per_token():
    hidden_size = 10
    weight = torch.randn(hidden_size, hidden_size, requires_grad=True)

    def fn(h, w):
        return (h @ w).sin()  # saves h and w (matmul), and h @ w (sin): 2 activations per token

    per_token = measure_bytes_per_token(fn, lambda n: (torch.randn(n, hidden_size), weight), tokens=(16, 48))
    assert per_token == 2 * hidden_size * 4
    block = TinyLlamaBlock()

    def make_inputs(n):
        cos, sin = rope_tables(n, n, 6)
        return torch.randn(n, 24), cos, sin, n

    assert measure_bytes_per_token(block, make_inputs, tokens=(8, 16)) > 0
