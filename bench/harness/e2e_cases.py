"""The cases of the end-to-end benchmark (system and checkpointing), which can run here, which share one
built model, and the order of work on that model."""

from __future__ import annotations

# case -> (system, checkpointing)
CASES: dict[str, tuple[str, str]] = {
    "stock": ("stock", "hf"),
    "lorafuse-none": ("lorafuse", "none"),
    "lorafuse-recompute": ("lorafuse", "recompute"),
    "lorafuse-offload": ("lorafuse", "offload"),
    "liger": ("liger", "hf"),
    "hf_packed": ("hf_packed", "hf"),
    "hf_patched": ("hf_patched", "hf"),
    # QLoRA: the same model with its projections in NF4 (double-quantized absmax, blocksize 64)
    "qlora-lorafuse": ("lorafuse-nf4", "recompute"),  # quantize: nf4, our dequantize kernel, per-layer recompute
    "qlora-peft": ("peft-bnb", "hf"),  # HF + PEFT on bitsandbytes Linear4bit, HF gradient checkpointing
}
HF_CASES = ("stock", "liger", "hf_packed", "hf_patched", "qlora-peft")
QLORA_CASES = ("qlora-lorafuse", "qlora-peft")
SHARED_HF = ("stock", "hf_packed", "hf_patched")  # one HF + PEFT model: batching and lorafuse.patch differ
DEFAULT_CASES = ["stock", "lorafuse-none", "lorafuse-recompute", "lorafuse-offload", "liger", "hf_packed",
                 "hf_patched"]
DEFAULT_MAX_CONTEXT = ["stock", "lorafuse-recompute", "lorafuse-offload"]


def case_available(case: str) -> str | None:
    """None if the case can run here, else why not."""
    if case == "liger":
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
    if case == "qlora-peft":
        try:
            import bitsandbytes  # noqa: F401 - a benchmark peer only, never a dependency of lorafuse
        except Exception as e:  # noqa: BLE001 - not installed, or its library does not load here
            return f"bitsandbytes does not import ({type(e).__name__}: {str(e)[:120]})"
    if case == "hf_packed":
        try:
            from transformers import masking_utils
        except ImportError:
            return "this transformers has no masking_utils"
        if not hasattr(masking_utils, "find_packed_sequence_indices"):
            return "this transformers does not build document masks from position_ids for SDPA"
    return None


def groups(cases: list[str]) -> list[list[str]]:
    """Cases that share one built model: stock, hf_packed and hf_patched (HF + PEFT; the batching differs, and
    hf_patched runs under lorafuse.patch); the lorafuse modes; each QLoRA case alone (its model quantized); liger
    alone and last (its patches of the HF classes outlive its model)."""
    found = [[c for c in cases if c in SHARED_HF], [c for c in cases if c.startswith("lorafuse-")],
             *([c] for c in cases if c in QLORA_CASES), [c for c in cases if c == "liger"]]
    return [g for g in found if g]


def plan(group: list[str], max_context: list[str]) -> list[tuple[str, str]]:
    """The order of work on one built model: training of the main cases (stock, hf_patched, lorafuse modes), then
    their max-context searches, then the peers' training (so a tight time budget cuts the peers first)."""
    main = [c for c in group if c not in ("hf_packed", "liger")] or group[:1]
    peers = [c for c in group if c not in main]
    return ([("train", c) for c in main] + [("context", c) for c in group if c in max_context]
            + [("train", c) for c in peers])
