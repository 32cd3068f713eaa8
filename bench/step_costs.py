"""What one training step costs per decoder layer, measured without a GPU: device operations and saved bytes.

    python bench/step_costs.py [--out bench/results]       # writes bench/results/step-costs-<date>.json

Device operations (launches): engine/step.py's train_step on a micro Llama (float16 frozen base, float32 LoRA
masters on all seven projections, as on a GPU but with float16 for bfloat16, which the interpreter cannot
compute) runs under a TorchDispatchMode that counts every aten op the step dispatches, with each Triton launch
counted as one op (the interpreter's own host copies are not counted). Ops that launch nothing are left out:
views, allocations, detach. The per-layer figure is the step of a 2-layer model minus that of a 1-layer
model, so whatever happens once per step (embedding, loss, optimizer) cancels, and it is the second step (the
optimizer's state is made in the first); the count is exact and
deterministic. A GPU runs the same host code, so it launches the same ops (plus cuBLAS' own split kernels,
and none of autotuning's reruns after the first step). One difference of kind, not of number: the float32
LoRA gradients are one torch.mm(out_dtype=float32) each on CUDA (cuBLAS), which CPU torch lacks, so here they
are one launch each of our GEMM kernel with a float32 output (counted as triton); a group's stacked dB's are our
kernel on both.

Saved bytes: the storages that autograd keeps for backward (saved-tensor hooks, each storage counted once
whatever views of it are saved; parameters are weights, not activations, and are left out), in the forward of
a model with Llama-3.1-8B's decoder widths (hidden 4096, 32 query and 8 key/value heads of 128, MLP 14336,
float16 for bfloat16: the same bytes) and LoRA r=16 on all seven projections. Per layer is 2 layers minus 1,
per token the difference between two token counts, so the figure is exact, not a fit. At these widths the
interpreter would take hours, so the kernels' launches are skipped: which tensors are kept is decided by the
host code, which runs as it does on a GPU, and no value of them is read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from contextlib import contextmanager
from datetime import date
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on the CPU
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

LLAMA_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336)
MICRO = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}
# ops that launch no device work: metadata, allocation
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view", "detach",
             "alias", "lift_fresh", "set_", "_local_scalar_dense_sync"}


def _llama(dims: dict, layers: int, vocab: int):
    from lorafuse.engine.demo.base_model import tiny_config

    return tiny_config("llama", vocab_size=vocab, hidden=dims["hidden"], layers=layers, heads=dims["heads"],
                       kv_heads=dims["kv_heads"], intermediate=dims["intermediate"], head_dim=dims["head_dim"])


def _model(config, rank: int, dtype=torch.float16, materialise: bool = True):
    """The HF model (frozen, `dtype`) with LoRA on all seven projections, prepared for the packed forward.
    materialise=False leaves the frozen weights uninitialised (nothing reads them)."""
    from transformers import AutoModelForCausalLM

    from lorafuse.engine.config import LoraConfig
    from lorafuse.engine.lora import inject_lora, lora_modules
    from lorafuse.engine.prepare import prepare_model

    torch.manual_seed(0)
    if materialise:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = model.to_empty(device="cpu")
    for p in model.parameters():  # the weights only: RoPE's inv_freq stays float32, as load_model leaves it
        p.data = p.data.to(dtype)
    model.requires_grad_(False)
    prepared = prepare_model(model)
    inject_lora(model, LoraConfig(r=rank, alpha=2 * rank, target_modules=TARGETS))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.02)  # PEFT starts B at 0; any value costs the same
    return model, prepared


def _batch(lengths, vocab: int):
    from lorafuse.engine.data import Document
    from lorafuse.engine.packing import make_batch

    rng = np.random.default_rng(0)
    return make_batch([Document(rng.integers(3, vocab, n), rng.random(n) < 0.8) for n in lengths])


# ----------------------------------------------------------------------------- launches


class _OpCounter(TorchDispatchMode):
    """Counts the ops that reach the device: {(phase, kind, name): n}. phase: forward, backward (inside the
    autograd engine) or update (after the first backward: all-reduce, clipping, the optimizer)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.backward_seen = False

    def phase(self) -> str:
        if torch._C._current_graph_task_id() != -1:
            self.backward_seen = True
            return "backward"
        return "update" if self.backward_seen else "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not (func.is_view or name in NO_LAUNCH):
            self.counts[(self.phase(), _kind(name, args, kwargs), name)] += 1
        return out


def _kind(name: str, args, kwargs) -> str:
    if name in MATMULS:
        return "matmul"
    if name in ("_to_copy", "copy_"):
        src = args[1] if name == "copy_" else args[0]
        dst_dtype = args[0].dtype if name == "copy_" else kwargs.get("dtype", src.dtype)
        return "cast" if dst_dtype != src.dtype else "copy"
    if name in ("cat", "block_diag", "clone", "contiguous", "stack"):
        return "copy"
    return "aten"


@contextmanager
def _triton_launches(counter: _OpCounter | None = None, execute: bool = True):
    """Each Triton launch is one op of `counter` (its kernel's name); execute=False skips the kernel itself."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if counter is not None:
            counter.counts[(counter.phase(), "triton", self.fn.__name__)] += 1
        if execute:
            with _disable_current_modes():  # the interpreter's copies to and from the host are not the kernel's
                return original(self, *args, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def step_ops(layers: int) -> Counter:
    """{(phase, kind, name): count} of one train_step of the micro model with `layers` decoder layers."""
    from lorafuse.engine.lora import lora_parameters
    from lorafuse.engine.step import train_step

    vocab = 97
    model, prepared = _model(_llama(MICRO, layers, vocab), rank=4)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as train.py on a GPU: one op per step
    batch = _batch((21, 1, 9), vocab)
    train_step(prepared, [batch], optimizer, params, max_grad_norm=1.0)  # the optimizer's state is made once
    counter = _OpCounter()
    with _triton_launches(counter), counter:
        train_step(prepared, [batch], optimizer, params, max_grad_norm=1.0)
    return counter.counts


def launches_per_layer() -> dict:
    one, two = step_ops(1), step_ops(2)
    per_layer = Counter(two)
    per_layer.subtract(one)
    per_layer = {k: n for k, n in per_layer.items() if n}
    summary: dict = {"total": sum(per_layer.values())}
    for phase in ("forward", "backward", "update"):
        ops = {k: n for k, n in per_layer.items() if k[0] == phase}
        kinds = Counter()
        for (_, kind, _), n in ops.items():
            kinds[kind] += n
        summary[phase] = {"total": sum(ops.values()), "by_kind": dict(sorted(kinds.items())),
                          "ops": {f"{kind}:{name}": n for (_, kind, name), n in sorted(ops.items())}}
    return summary


# ----------------------------------------------------------------------------- saved activations


def saved_storages(layers: int, tokens: int, dims: dict = LLAMA_8B, rank: int = 16) -> list[dict]:
    """The distinct non-parameter storages the forward keeps for backward (module docstring), in the order they
    were first saved: bytes, the decoder layer that first saved it (None: outside the layers) and the op."""
    from lorafuse.engine import forward

    model, prepared = _model(_llama(dims, layers, vocab=128), rank=rank, materialise=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    for layer in prepared.layers:  # the stacked frozen weights are weights too
        weights |= {s.weight.untyped_storage().data_ptr() for s in (layer.qkv, layer.gate_up) if s is not None}
    kept: dict = {}
    current = {"layer": None}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in kept:
            kept[storage.data_ptr()] = {"bytes": storage.nbytes(), "layer": current["layer"], "op": _saving_op(),
                                        "dtype": str(t.dtype).removeprefix("torch.")}
        return t

    def decoder_layer(hidden, layer, batch, prepared):
        current["layer"] = prepared.layers.index(layer)
        try:
            return plain_layer(hidden, layer, batch, prepared)
        finally:
            current["layer"] = None

    plain_layer = forward.decoder_layer
    batch = _batch([tokens // 4] * 4, 128)  # four documents: the attention's tile lists grow with them too
    forward.decoder_layer = decoder_layer
    try:
        with _triton_launches(execute=False), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward.packed_hidden_states(prepared, batch)
    finally:
        forward.decoder_layer = plain_layer
    return list(kept.values())


def _saving_op() -> str:
    """The lorafuse function that called the autograd Function saving a tensor (file:function)."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename)
        if path.parent.name in ("kernels", "engine") and path.name != "step_costs.py":
            return f"{path.parent.name}/{path.name}:{frame.name}"
    return "?"


def saved_bytes(layers: int, tokens: int, dims: dict = LLAMA_8B, rank: int = 16) -> int:
    return sum(s["bytes"] for s in saved_storages(layers, tokens, dims, rank))


def saved_per_token_per_layer(t1: int = 64, t2: int = 128, dims: dict = LLAMA_8B, rank: int = 16) -> dict:
    per_layer = {t: saved_bytes(2, t, dims, rank) - saved_bytes(1, t, dims, rank) for t in (t1, t2)}
    per_token = (per_layer[t2] - per_layer[t1]) / (t2 - t1)
    # where they go: the storages the second of two layers saved first (the first also saves the batch's)
    last_layer = [s for s in saved_storages(2, t2, dims, rank) if s["layer"] == 1]
    return {"bytes_per_token_per_layer": per_token,
            "fixed_bytes_per_layer": per_layer[t1] - per_token * t1,
            "tokens_measured": [t1, t2],
            "storages_of_a_layer": [{"op": s["op"], "dtype": s["dtype"], "bytes_per_token": s["bytes"] / t2}
                                    for s in last_layer]}


# ----------------------------------------------------------------------------- the results file


def measure() -> dict:
    import triton

    return {
        "what": "device operations per decoder layer per training step, and bytes saved for backward per token "
                "per decoder layer (bench/step_costs.py docstring: how)",
        "command": "python bench/step_costs.py",
        "torch": torch.__version__, "triton": triton.__version__,
        "launches_per_layer": {"model": {"micro_llama": MICRO, "lora_rank": 4, "dtype": "float16 base, float32 LoRA"},
                               **launches_per_layer()},
        "saved_activations": {"model": {"llama_3.1_8b_decoder": LLAMA_8B, "lora_rank": 16, "dtype": "16-bit"},
                              **saved_per_token_per_layer()},
    }


def compare(result: dict, before: dict) -> dict:
    """result with the figures of an earlier results file and issue 14's goals (40 ops per layer, 25% fewer
    saved bytes than before) beside it."""
    launches, saved = before["launches_per_layer"], before["saved_activations"]["bytes_per_token_per_layer"]
    goals = {"launches_per_layer": 40, "saved_bytes_per_token_per_layer": 0.75 * saved}
    goals["met"] = {"launches_per_layer": result["launches_per_layer"]["total"] <= goals["launches_per_layer"],
                    "saved_bytes_per_token_per_layer": result["saved_activations"]["bytes_per_token_per_layer"]
                    <= goals["saved_bytes_per_token_per_layer"]}
    summary = {"measured_at": before.get("measured_at"),
               "launches_per_layer": {k: launches[k]["total"] if isinstance(launches[k], dict) else launches[k]
                                      for k in ("total", "forward", "backward", "update")},
               "saved_bytes_per_token_per_layer": saved}
    return {**result, "before": summary, "goals": goals}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results", help="folder of the results file")
    parser.add_argument("--label", default="", help="a suffix of the file name (e.g. -before)")
    parser.add_argument("--measured-at", default=None, help="what was measured (a branch, a commit)")
    parser.add_argument("--before", default=None, help="an earlier results file to compare with")
    args = parser.parse_args(argv)
    result = {"measured_at": args.measured_at, **measure()}
    if args.before:
        result = compare(result, json.loads(Path(args.before).read_text()))
    path = Path(args.out) / f"step-costs-{date.today().isoformat()}{args.label}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    lp, sa = result["launches_per_layer"], result["saved_activations"]
    print(f"{path}: {lp['total']} ops per layer (forward {lp['forward']['total']}, backward "
          f"{lp['backward']['total']}, update {lp['update']['total']}); "
          f"{sa['bytes_per_token_per_layer']:.0f} saved bytes per token per layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
