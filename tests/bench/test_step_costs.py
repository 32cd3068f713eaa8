"""bench/step_costs.py's counts hold the goals of issue 14: at most 40 device operations per decoder layer per
training step, none of them a cast, and no more bytes kept for backward per token per layer than recorded.
Counts, not timings: both are exact and deterministic (the script's docstring says how they are taken)."""

import pytest
import torch

from harness_utils import load_script

MAX_LAUNCHES_PER_LAYER = 40  # issue 14's goal (main: 86 = 39 forward + 47 backward)
# Llama-3.1-8B widths, r = 16 on all seven projections, 16-bit: main kept 121,192 bytes per token per layer
# (110,952 with q/k/v kept apart; 94,568 with the normalised inputs rebuilt from the norms' inputs; 90,472 with
# k and v computed again in attention's backward); issue 14's goal is 25% less: 90,894
MAX_SAVED_BYTES_PER_TOKEN = 90_472


@pytest.fixture(scope="module")
def step_costs():
    return load_script("step_costs")


def test_launches_per_layer_within_the_goal(step_costs):
    counts = step_costs.launches_per_layer()
    assert counts["total"] <= MAX_LAUNCHES_PER_LAYER, counts
    assert counts["update"]["total"] == 0, counts["update"]  # the optimizer's work does not grow with layers
    for phase in ("forward", "backward"):
        # float32 masters read in place and float32 gradients written directly: no cast, no copy of adapters
        assert "cast" not in counts[phase]["by_kind"], counts[phase]
        assert "copy" not in counts[phase]["by_kind"], counts[phase]
        # the attention tile lists are built once per micro-batch, not per layer
        assert not {"cumsum", "searchsorted"} & {op.split(":")[1] for op in counts[phase]["ops"]}, counts[phase]


def test_saved_bytes_per_token_per_layer(step_costs):
    from lorafuse.engine.activations.planner import llama_layer_bytes_per_token

    saved = step_costs.saved_per_token_per_layer()
    assert saved["bytes_per_token_per_layer"] <= MAX_SAVED_BYTES_PER_TOKEN, saved
    # the checkpointing planner (and `lorafuse plan`) counts exactly what the forward keeps
    assert saved["bytes_per_token_per_layer"] == llama_layer_bytes_per_token(4096, 14336, 32, 8, dtype=torch.bfloat16,
                                                                             lora_rank=16)
    assert saved["fixed_bytes_per_layer"] == 0, saved  # no per-call copy of the adapters is kept
