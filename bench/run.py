"""The one benchmark command: GPU tests, kernel micro-benchmarks and the end-to-end benchmark on one GPU.

    python bench/run.py                  # ~10 minutes on one H100/H200 (make bench-gpu)
    python bench/run.py --quick          # ~5 minutes: fewer steps, shorter searches
    python bench/run.py --only e2e --models llama-3.1-8b qwen2.5-7b --time-budget-s 1500
    python bench/run.py --only e2e --merge --out "$OUT/results"   # one part of a run split over calls
    python bench/run.py --only tests --stage-budget tests=420        # a stage's own budget

Stages, each in its own subprocess with its own time budget (a failure or a timeout is recorded in the
results and the next stage runs; a CUDA error in one stage cannot poison the next):

  env       GPU name, versions, the measured bf16 matmul peak (lorafuse.engine.metrics.peak_matmul_flops)
            and copy bandwidths; builds the offload extension once so no later stage pays for it
  tests     pytest -m gpu tests (TRITON_INTERPRET=0): pass / fail / skip counts and the failed ids
  kernels   pytest bench/kernels (TRITON_INTERPRET=0), one process per file; each case's extra_info
            (system, shape, median_ms, tflops or gb_per_s, peak memory) is collected as it finishes
  e2e       bench/e2e.py per model, one process per built model: stock HF + PEFT, its max-context search,
            then hf_packed (the same model without padding); lorafuse with checkpointing none / recompute /
            offload, then the max-context searches of recompute and offload
  peers     bench/e2e.py for liger (HF + PEFT + Liger-Kernel) where it is installed
  checkpointing  bench/bench_checkpointing.py at 8 layers (only with --with-checkpointing)
  static    python -m lorafuse.kernels.aot --report: registers, spills, shared memory and tensor-core shapes
            of every shipped kernel config for sm_80 and sm_90 (only with --with-static; needs no GPU)

Writes bench/results/<gpu>-<YYYY-MM-DD>.json (rewritten after every stage, so a killed run keeps what
it measured; --quick adds -quick to the name), then bench/report.py makes the markdown table and PNG
plots next to it (--readme README.md also refreshes the README's results section). With --merge, a
results file already there keeps what the stages not run now measured, and `calls` lists every run.

The kernels stage loads the pytest plugin bench/harness/record_cases.py (`-p record_cases`): it appends
every finished benchmark case to $LORAFUSE_BENCH_JSONL, so a file that runs out of time keeps its finished
cases. This file is the command line; the stages are the modules bench/harness/stage*.py.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "harness"))  # its modules; PYTHONSAFEPATH=1 adds no path

from report_e2e import e2e_table, max_context_table  # noqa: E402
from report_page import tests_lines  # noqa: E402
from stage_env import worker_env  # noqa: E402
from stages import BUDGETS, STAGES, run_stages  # noqa: E402


def _stage_budget(text: str) -> tuple[str, float]:
    stage, _, seconds = text.partition("=")
    if stage not in BUDGETS or stage == "total":
        raise argparse.ArgumentTypeError(f"{text!r}: a stage with its own budget is one of "
                                         f"{', '.join(k for k in BUDGETS if k != 'total')}")
    try:
        value = float(seconds)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: SECONDS must be a number above 0")
    return stage, value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="about 5 minutes: fewer steps, shorter searches")
    parser.add_argument("--out", default=str(BENCH / "results"), help="results directory")
    parser.add_argument("--name", default=None, help="results file name without .json (default <gpu>-<date>)")
    parser.add_argument("--only", nargs="+", choices=STAGES, default=None, help="run only these stages (env always)")
    parser.add_argument("--skip", nargs="+", choices=STAGES, default=[], help="stages to leave out")
    parser.add_argument("--with-checkpointing", action="store_true",
                        help="also run bench/bench_checkpointing.py (8 layers, no search)")
    parser.add_argument("--with-static", action="store_true",
                        help="also run the static report (python -m lorafuse.kernels.aot --report)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="the whole run (default 570, quick 330)")
    parser.add_argument("--stage-budget", nargs="+", default=[], metavar="STAGE=SECONDS", type=_stage_budget,
                        help="a stage's own budget instead of its default, e.g. tests=500 (not e2e/peers: they "
                             "get what is left)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="e2e models (default llama-3.1-8b; llama-3.2-1b on GPUs under 40 GiB)")
    parser.add_argument("--all-models", action="store_true",
                        help="also Qwen2.5-7B, Mistral-7B and Llama-3.2-1B, as time allows")
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--max-context", nargs="*", default=["stock", "lorafuse-recompute", "lorafuse-offload"])
    parser.add_argument("--kernel-files", nargs="+", default=None, help="kernel benchmark files (default all)")
    parser.add_argument("--e2e-args", default="", help="extra arguments for every bench/e2e.py call (quoted)")
    parser.add_argument("--readme", default=None, help="also refresh this README's results section")
    parser.add_argument("--logs", default=None,
                        help="keep every stage's log and raw output in this folder (default: a temporary one)")
    parser.add_argument("--merge", action="store_true",
                        help="keep what an earlier run into the same results file measured in the stages not run now")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=True,
                        help="echo every stage's output")
    parser.add_argument("--worker", choices=["env"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.e2e_args = shlex.split(args.e2e_args)
    return args


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    if args.worker == "env":
        worker_env(args.worker_out)
        return None
    given = sys.argv[1:] if argv is None else list(argv)
    results, path = run_stages(args, given)
    print("\n" + "\n".join(e2e_table(results) + max_context_table(results) + [""] + tests_lines(results)))
    if not args.no_report:
        sys.path.insert(0, str(BENCH))  # report.py beside this file
        import report

        try:
            report.main([str(path)] + (["--readme", args.readme] if args.readme else []))
        except (Exception, SystemExit) as error:  # noqa: BLE001 - the results file is what matters
            print(f"[report] failed: {type(error).__name__}: {error}")
    print(f"\nresults: {path} ({results['duration_s']:.0f} s)")
    return path


if __name__ == "__main__":
    main()
