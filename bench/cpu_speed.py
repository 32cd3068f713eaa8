"""The CPU path side by side: lorafuse against stock HF + PEFT, training steps alternated in one process.

Every CPU user runs the PyTorch references of lorafuse's ops (and `lorafuse demo` does), so this is the
speed they get. Both systems train the same ~20M-parameter Llama (e2e_models.py "llama-20m", random float32
weights, seeded) with the same LoRA (r=16 on all seven projections, identical initial adapters), on the same
steps of documents of mixed lengths (lognormal, every token trained), with the same AdamW and clipping,
as bench/e2e.py defines them: stock is HF + PEFT with padded micro-batches, SDPA and HF gradient
checkpointing; lorafuse is the engine's own train_step on one packed micro-batch. On a CPU memory is rarely
what limits, so HF + PEFT is also measured as a CPU user would run it, without gradient checkpointing:
padded (stock-nockpt) and packed (hf_packed-nockpt: each micro-batch's documents in one row, position_ids
restarting per document). The steps alternate (stock, ..., lorafuse, stock, ...), so a machine that gets
busier or quieter during the run affects every system alike; the figure is useful (document) tokens/s of
each system's median step, and lorafuse's ratio to each peer and to the fastest.

    python bench/cpu_speed.py --out bench/results/cpu-speed-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "harness"))  # its modules; PYTHONSAFEPATH=1 adds no path

from e2e_data import DataMix, make_steps  # noqa: E402
from e2e_hf_runner import HFRunner  # noqa: E402
from e2e_lorafuse_runner import LorafuseRunner  # noqa: E402
from e2e_runner import Settings  # noqa: E402


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(args) -> dict:
    settings = Settings(model=args.model, device=torch.device("cpu"), dtype=torch.float32, seed=args.seed,
                        stock_batch_size=args.stock_batch_size)
    runners = {}
    for name in args.peers:
        case, _, nockpt = name.partition("-")
        runners[name] = HFRunner(settings, case)
        if nockpt:
            base = runners[name].model.get_base_model()  # transformers renamed it (the old name warns)
            (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
            runners[name].info["hf_checkpointing"] = "off"
    runners["lorafuse"] = LorafuseRunner(settings)
    vocab = runners["lorafuse"].config.vocab_size
    mix = DataMix(median=args.doc_median, sigma=args.doc_sigma, max_len=args.doc_max, min_len=args.doc_min)
    steps = make_steps(args.warmup + args.steps, args.tokens_per_step, vocab, mix, args.seed)
    prepared = {name: [r.prepare(docs) for docs in steps] for name, r in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    losses: dict[str, list[float]] = {name: [] for name in runners}
    load_before = load_average()
    for index in range(len(steps)):
        for name, runner in runners.items():
            started = time.perf_counter()
            loss = float(runner.step(prepared[name][index]))
            seconds = time.perf_counter() - started
            losses[name].append(loss)
            if index >= args.warmup:
                times[name].append(seconds)
            print(f"  step {index + 1}/{len(steps)} {name:8} loss {loss:.5f}  {seconds * 1e3:.0f} ms"
                  + (" (warm-up)" if index < args.warmup else ""), flush=True)
    useful = statistics.mean(p.useful_tokens for p in prepared["lorafuse"][args.warmup:])
    rows = {}
    for name in runners:
        median = statistics.median(times[name])
        rows[name] = {"step_time_s": median, "step_times_s": times[name], "tokens_per_s": useful / median,
                      "step_losses": losses[name], "padding_fraction": 1 - sum(p.useful_tokens for p in prepared[name])
                      / sum(p.processed_tokens for p in prepared[name]), **runners[name].info}
    ratios = {peer: rows["lorafuse"]["tokens_per_s"] / rows[peer]["tokens_per_s"] for peer in args.peers}
    fastest = max(args.peers, key=lambda peer: rows[peer]["tokens_per_s"])
    import transformers

    return {
        "benchmark": "cpu_speed", "date": datetime.date.today().isoformat(), "model": args.model,
        "parameters": sum(p.numel() for p in runners["lorafuse"].model.parameters() if not p.requires_grad),
        "tokens_per_step": args.tokens_per_step, "useful_tokens_per_step": useful,
        "doc_lengths": {"median": args.doc_median, "sigma": args.doc_sigma, "min": args.doc_min, "max": args.doc_max},
        "warmup": args.warmup, "steps": args.steps, "systems": rows, "lorafuse_vs": ratios,
        "fastest_peer": fastest, "lorafuse_vs_fastest_peer": ratios[fastest],
        "load_average_before": load_before, "load_average_after": load_average(),
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine(),
                        "kernels": os.environ.get("LORAFUSE_KERNELS", "auto")},
        "command": " ".join(["python", "bench/cpu_speed.py", *sys.argv[1:]]),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-20m")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--stock-batch-size", type=int, default=4, help="documents per padded HF micro-batch")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="timed steps per system")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc-median", type=float, default=100.0)
    p.add_argument("--doc-sigma", type=float, default=1.0)
    p.add_argument("--doc-min", type=int, default=8)
    p.add_argument("--doc-max", type=int, default=1024)
    p.add_argument("--peers", nargs="+", default=["stock", "stock-nockpt", "hf_packed-nockpt"],
                   choices=["stock", "stock-nockpt", "hf_packed", "hf_packed-nockpt"],
                   help="HF + PEFT cases; -nockpt: without HF gradient checkpointing")
    p.add_argument("--out", help="JSON results file")
    args = p.parse_args(argv)
    result = run(args)
    for name, row in result["systems"].items():
        print(f"{name:9} {row['tokens_per_s']:8.0f} useful tokens/s  (median step {row['step_time_s']:.2f} s)")
    for peer, ratio in result["lorafuse_vs"].items():
        print(f"lorafuse / {peer}: {ratio:.2f}x")
    print(f"lorafuse / the fastest peer ({result['fastest_peer']}): {result['lorafuse_vs_fastest_peer']:.2f}x  "
          f"(load average before {result['load_average_before']}, after {result['load_average_after']})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
