"""Activation checkpointing benchmark: peak memory and step time per checkpointing method.

Llama-3.1-8B decoder layers (from transformers' LlamaConfig and LlamaDecoderLayer, random bf16
weights, frozen, LoRA rank 16 on all seven projections), one packed micro-batch of T tokens made
of documents of --doc-len tokens (causal attention inside each document; RoPE positions restart
per document). A step is forward + backward of the layer stack with a random output gradient
(embedding, final norm, LM head and loss are outside what checkpointing changes, and left out).

Methods:
  none                  plain forward: every layer keeps its activations
  recompute             LayerCheckpointer, every layer "recompute" (torch.utils.checkpoint, non-reentrant)
  offload               LayerCheckpointer, every layer "offload" but the last ("recompute")
  plan                  plan_checkpointing's modes for this GPU's memory (measured bytes per token)
  save_on_cpu           torch.autograd.graph.save_on_cpu(pin_memory=True) around the stack, no recompute
  save_on_cpu+recompute the recompute method inside save_on_cpu (PyTorch moves each checkpoint's input)

Per method and size: step time (median of --steps, CUDA events, after --warmup steps), peak memory
(torch.cuda.max_memory_allocated after a reset) in total and above the memory held before the step
(weights, LoRA, inputs: the activation peak), and pinned host memory of the offload arena. Then, with
--search, the largest T that fits for each method (doubling, then bisection to --search-step tokens).

    python bench/bench_checkpointing.py --out bench/results/<gpu>-<date>-checkpointing.json
    python bench/bench_checkpointing.py --layers 8 --tokens 16384 32768 --no-search --out /tmp/quick.json
    python bench/bench_checkpointing.py --smoke --out /tmp/smoke.json   # tiny CPU run: the script works

The issue's goal: at 32k tokens, offload's peak at least 30% below recompute's at no more than 5%
extra step time. The summary prints both ratios (activation peak and total peak).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

METHODS = ["none", "recompute", "offload", "plan", "save_on_cpu", "save_on_cpu+recompute"]
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def llama_31_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, vocab_size=128256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )


def tiny_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, vocab_size=128)


class LoRALinear(torch.nn.Module):
    """Frozen base linear plus scaling * (x @ A^T) @ B^T (PEFT layout), dropout 0."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float = 32.0):
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype,
                                                     device=base.weight.device) / base.in_features**0.5)
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                                     device=base.weight.device))
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t() * self.scaling


def document_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, doc_len=None,
                       **kwargs):
    """Causal attention inside each document of doc_len tokens (packed back to back): the documents
    become a batch, so SDPA's flash kernel runs with the memory and FLOPs of varlen attention."""
    _, heads, tokens, head_dim = query.shape  # [1, H, T, D]
    doc_len = doc_len or tokens
    docs = tokens // doc_len

    def per_doc(t):
        return t[0].view(t.shape[1], docs, doc_len, head_dim).transpose(0, 1)  # [docs, heads, doc_len, D]

    out = torch.nn.functional.scaled_dot_product_attention(per_doc(query), per_doc(key), per_doc(value),
                                                           is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).reshape(1, tokens, heads, head_dim), None  # HF's layout: [B, T, H, D]


def build_layers(config, device, dtype, lora_rank: int):
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    AttentionInterface.register("bench_documents", document_attention)
    config._attn_implementation = "bench_documents"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            n_layers = config.num_hidden_layers
            layers = torch.nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(n_layers))
            rotary = LlamaRotaryEmbedding(config)
    finally:
        torch.set_default_dtype(previous)
    layers.requires_grad_(False)
    if lora_rank:
        for layer in layers:
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    setattr(parent, name, LoRALinear(getattr(parent, name), lora_rank))
    return layers.train(), rotary


# ---------------------------------------------------------------------------------------------
# One step per method
# ---------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, args, config, device, dtype):
        from lorafuse.engine import activations
        from lorafuse.engine.activations.checkpointer import DEFAULT_MIN_OFFLOAD_BYTES

        self.ckpt_module = activations
        self.args, self.config, self.device, self.dtype = args, config, device, dtype
        self.layers, self.rotary = build_layers(config, device, dtype, args.lora_rank)
        self.n_layers = config.num_hidden_layers
        self.cuda = device.type == "cuda"
        self.host_limit = activations.default_host_limit()
        # An offload mode from the start: the arena (and the extension's build on first use) is set up
        # here, not inside a timed step.
        self.checkpointer = activations.LayerCheckpointer(
            device, ["offload"] + ["recompute"] * (self.n_layers - 1), max_host_bytes=self.host_limit,
            min_offload_bytes=0 if args.smoke else DEFAULT_MIN_OFFLOAD_BYTES)
        self.last_step = {}
        self.input_bytes_per_token = config.hidden_size * torch.empty((), dtype=dtype).element_size()
        self.kept_bytes_per_token = self.measure_kept_bytes_per_token()

    def inputs(self, tokens: int, doc_len: int):
        hidden = torch.randn(1, tokens, self.config.hidden_size, device=self.device, dtype=self.dtype)
        hidden.requires_grad_(self.args.lora_rank == 0)  # without LoRA, something must need a gradient
        positions = (torch.arange(tokens, device=self.device) % doc_len)[None]
        cos, sin = self.rotary(hidden, positions)
        return hidden, cos, sin

    def layer_fn(self, layer, doc_len: int):
        def fn(hidden, cos, sin):
            out = layer(hidden, position_embeddings=(cos, sin), doc_len=doc_len)
            return out[0] if isinstance(out, tuple) else out

        return fn

    def measure_kept_bytes_per_token(self) -> float:
        """What one plain layer saves per token (one document per measurement, so doc_len = T)."""

        def fn(hidden, cos, sin):
            return self.layer_fn(self.layers[0], hidden.shape[1])(hidden, cos, sin)

        tokens = min(self.args.doc_len, 1024)
        return self.ckpt_module.measure_bytes_per_token(fn, lambda n: self.inputs(n, n),
                                                        tokens=(tokens, 2 * tokens))

    def modes(self, method: str, tokens: int) -> list[str] | None:
        n = self.n_layers
        if method in ("recompute", "save_on_cpu+recompute"):
            return ["recompute"] * n
        if method == "offload":
            return self.ckpt_module.layer_modes("offload", n)
        if method == "plan":
            return self.ckpt_module.plan_checkpointing(
                n, self.kept_bytes_per_token, self.input_bytes_per_token, tokens, self.activation_budget())
        return None

    def activation_budget(self) -> float:
        if not self.cuda:
            return float("inf")
        total = torch.cuda.get_device_properties(self.device).total_memory
        held = torch.cuda.memory_allocated(self.device)
        # Inputs, output gradient, RoPE tables and allocator slack are outside the model's activations.
        return max(0.0, 0.92 * total - held - self.args.budget_margin_gb * GIB)

    def host_bytes_needed(self, method: str, tokens: int) -> float:
        if method == "save_on_cpu":
            return 2 * tokens * self.kept_bytes_per_token * self.n_layers  # pinned blocks round up to 2^k
        if method == "save_on_cpu+recompute":
            return 2 * tokens * self.input_bytes_per_token * self.n_layers
        return 0.0

    def step(self, method: str, tokens: int, modes: list[str] | None):
        hidden, cos, sin = self.inputs(tokens, self.args.doc_len)
        grad_out = torch.randn_like(hidden)
        context = contextlib.nullcontext()
        if method.startswith("save_on_cpu"):
            context = torch.autograd.graph.save_on_cpu(pin_memory=self.cuda)
        if modes is not None:
            self.checkpointer.set_modes(modes)
        before = self.checkpointer.stats()
        with context:
            out = hidden
            for index, layer in enumerate(self.layers):
                fn = self.layer_fn(layer, self.args.doc_len)
                if modes is None:
                    out = fn(out, cos, sin)
                else:
                    out = self.checkpointer.checkpoint(index, fn, out, cos, sin)
        out.backward(grad_out)
        after = self.checkpointer.stats()
        if "offloads" in after:
            self.last_step = {"host_offloaded_gib": after["used_bytes"] / GIB,
                              "host_arena_gib": after["capacity_bytes"] / GIB,
                              **{key: after[key] - before.get(key, 0)
                                 for key in ("offloads", "prefetch_hits", "prefetch_misses")}}
        self.checkpointer.end_step()
        for p in self.layers.parameters():
            p.grad = None

    def measure(self, method: str, tokens: int, warmup: int, steps: int) -> dict:
        row = {"method": method, "tokens": tokens, "status": "ok"}
        modes = self.modes(method, tokens)
        if modes is not None:
            row["modes"] = {m: modes.count(m) for m in ("none", "recompute", "offload") if m in modes}
        if self.host_bytes_needed(method, tokens) > self.host_limit:
            needed = self.host_bytes_needed(method, tokens) / GIB
            row["status"] = f"skipped: needs ~{needed:.0f} GiB pinned host RAM"
            return row
        times = []
        self.last_step = {}
        try:
            for _ in range(warmup):
                self.step(method, tokens, modes)
            if self.cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
            for _ in range(steps):
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    self.step(method, tokens, modes)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    started = time.perf_counter()
                    self.step(method, tokens, modes)
                    times.append((time.perf_counter() - started) * 1e3)
            row["step_ms"] = statistics.median(times)
            row["tokens_per_s"] = tokens / (row["step_ms"] / 1e3)
            if self.cuda:
                peak = torch.cuda.max_memory_allocated(self.device)
                row["peak_gib"] = peak / GIB
                row["activation_peak_gib"] = (peak - base) / GIB
            if modes is not None and "offload" in modes:
                row.update(self.last_step)
        except torch.OutOfMemoryError:
            row["status"] = "OOM"
        except RuntimeError as error:
            if "arena overflow" not in str(error) and "out of memory" not in str(error).lower():
                raise
            row["status"] = "host RAM limit" if "arena overflow" in str(error) else "OOM"
        finally:
            self.cleanup()
        return row

    def cleanup(self):
        with contextlib.suppress(Exception):
            self.checkpointer.end_step()
        for p in self.layers.parameters():
            p.grad = None
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Largest context that fits
# ---------------------------------------------------------------------------------------------


def largest_context(runner: Runner, method: str, start: int, step: int, limit: int, deadline: float) -> dict:
    """Doubles T from `start` until a step fails or T passes `limit`, then bisects to `step` tokens.
    Stops early at `deadline` (time.monotonic()); each probe is one step without warm-up."""
    probes = []

    def fits(tokens: int) -> bool:
        row = runner.measure(method, tokens, warmup=0, steps=1)
        probes.append({key: row.get(key) for key in ("tokens", "status", "peak_gib", "step_ms")})
        return row["status"] == "ok"

    good, bad, limited_by = 0, None, "search limit"
    tokens = start
    while tokens <= limit:
        if time.monotonic() > deadline:
            limited_by = "time"
            break
        if not fits(tokens):
            bad, limited_by = tokens, "memory"
            break
        good, tokens = tokens, tokens * 2
    while bad is not None and bad - good > step:
        middle = (good + bad) // 2 // step * step
        if middle <= good or time.monotonic() > deadline:
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return {"method": method, "largest_tokens": good, "first_failure": bad, "limited_by": limited_by,
            "probes": probes}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--doc-len", type=int, default=4096, help="tokens per packed document")
    parser.add_argument("--lora-rank", type=int, default=16, help="0: no LoRA (the input needs a gradient)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                        help="find the largest context per method")
    parser.add_argument("--search-step", type=int, default=8192)
    parser.add_argument("--search-limit", type=int, default=1 << 20)
    parser.add_argument("--search-time-s", type=float, default=300.0,
                        help="time budget of each method's search")
    parser.add_argument("--budget-margin-gb", type=float, default=2.0,
                        help="plan: GPU memory kept out of the activation budget")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on the CPU, float32 (checks the script)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.doc_len, args.lora_rank = 3, 16, 4
        args.tokens, args.warmup, args.steps, args.search = [32, 64], 0, 1, False
        args.search_step, args.search_limit = 16, 64
    for tokens in args.tokens:
        if tokens % args.doc_len:
            parser.error(f"--tokens {tokens} is not a multiple of --doc-len {args.doc_len}")
    if args.search_step % args.doc_len:
        parser.error("--search-step must be a multiple of --doc-len")
    return args


def print_table(rows):
    header = (f"{'method':<22} {'tokens':>7} {'step ms':>9} {'tok/s':>9} {'peak GiB':>9} {'act GiB':>8} "
              f"{'host GiB':>8}  status")  # host: bytes the offload arena holds for one step
    print(header)
    print("-" * len(header))

    def fmt(value, spec):
        if isinstance(value, (int, float)):
            return format(value, spec)
        return format("-", spec.split(".")[0] + "s")

    for row in rows:
        print(f"{row['method']:<22} {row['tokens']:>7} {fmt(row.get('step_ms'), '>9.1f')} "
              f"{fmt(row.get('tokens_per_s'), '>9.0f')} {fmt(row.get('peak_gib'), '>9.2f')} "
              f"{fmt(row.get('activation_peak_gib'), '>8.2f')} "
              f"{fmt(row.get('host_offloaded_gib'), '>8.2f')}  "
              f"{row['status']}")


def summarise(rows):
    """offload against recompute at each size: the issue's goal is checked at 32k tokens."""
    out = []
    by_key = {(r["method"], r["tokens"]): r for r in rows if r["status"] == "ok"}
    for (method, tokens), row in sorted(by_key.items(), key=lambda item: item[0][1]):
        base = by_key.get(("recompute", tokens))
        if method != "offload" or base is None:
            continue
        entry = {"tokens": tokens, "time_ratio": row["step_ms"] / base["step_ms"]}
        if "peak_gib" in row:
            entry["peak_reduction"] = 1 - row["peak_gib"] / base["peak_gib"]
            entry["activation_peak_reduction"] = 1 - row["activation_peak_gib"] / base["activation_peak_gib"]
        out.append(entry)
    return out


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda and not args.smoke:
        sys.exit("needs a CUDA GPU (or --smoke)")
    torch.manual_seed(0)
    config = tiny_config(args.layers) if args.smoke else llama_31_8b_config(args.layers)
    runner = Runner(args, config, device, dtype)
    from lorafuse.engine.extension import extension_status

    rows = []
    for tokens in args.tokens:
        for method in args.methods:
            row = runner.measure(method, tokens, args.warmup, args.steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    largest = []
    if args.search:
        for method in args.methods:
            fitted = [r["tokens"] for r in rows if r["method"] == method and r["status"] == "ok"]
            start = max(fitted) if fitted else args.search_step
            deadline = time.monotonic() + args.search_time_s
            found = largest_context(runner, method, start, args.search_step, args.search_limit, deadline)
            largest.append(found)
            print(json.dumps({k: v for k, v in largest[-1].items() if k != "probes"}), flush=True)

    import transformers

    result = {
        "benchmark": "activation checkpointing",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]) if argv is None else f"main({argv})",
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "offload_backend": runner.checkpointer.backend,
        "extension": extension_status(),
        "config": {"layers": args.layers, "hidden": config.hidden_size,
                   "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
                   "kv_heads": config.num_key_value_heads,
                   "doc_len": args.doc_len, "lora_rank": args.lora_rank, "dtype": str(dtype),
                   "warmup": args.warmup, "steps": args.steps},
        "kept_bytes_per_token_per_layer_measured": runner.kept_bytes_per_token,
        "input_bytes_per_token_per_layer": runner.input_bytes_per_token,
        "host_limit_gib": runner.host_limit / GIB,
        "rows": rows,
        "offload_vs_recompute": summarise(rows),
        "largest_context": largest,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print()
    print(f"{result['device']}, torch {result['torch']}, offload backend: {result['offload_backend']}")
    print(f"measured: a kept layer saves {runner.kept_bytes_per_token / 1024:.1f} KiB per token")
    print_table(rows)
    for entry in result["offload_vs_recompute"]:
        line = f"offload vs recompute at {entry['tokens']} tokens: step time x{entry['time_ratio']:.3f}"
        if "peak_reduction" in entry:
            line += (f", peak -{100 * entry['peak_reduction']:.1f}% "
                     f"(activations -{100 * entry['activation_peak_reduction']:.1f}%)")
        print(line)
    for entry in largest:
        print(f"largest context, {entry['method']}: {entry['largest_tokens']} tokens (limited by "
              f"{entry['limited_by']}; first failure: {entry['first_failure']})")
    print(f"wrote {args.out}")
    return result


def test_smoke(tmp_path, monkeypatch):
    """The script runs end to end on a tiny CPU model (pytest collects bench_*.py files)."""
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path / "cache"))  # unless a test loaded it already
    result = main(["--smoke", "--out", str(tmp_path / "checkpointing.json")])
    assert {row["method"] for row in result["rows"]} == set(METHODS)
    assert all(row["status"] == "ok" for row in result["rows"]), result["rows"]
    assert math.isfinite(result["kept_bytes_per_token_per_layer_measured"])
    assert json.loads((tmp_path / "checkpointing.json").read_text())["rows"] == result["rows"]


if __name__ == "__main__":
    main()
