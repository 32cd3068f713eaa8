"""Markdown tables and PNG plots from a benchmark results file (bench/run.py writes it).

    python bench/report.py bench/results/h100-80gb-hbm3-2025-01-31.json
    python bench/report.py bench/results --readme README.md     # the newest results file in the folder

Writes, next to the results file: <name>.md (end-to-end table with ratios to stock measured in the same
run, max context, kernels grouped by op with their time relative to lorafuse's, GPU tests, environment
and the exact command), <name>-e2e.png (useful tokens/s and peak memory per system) and
<name>-kernels.png (kernel time per system, one panel per op). With --readme, the text between
`<!-- bench:start -->` and `<!-- bench:end -->` in that README is replaced by the newest table, the plot
links and the command to reproduce; running it again with the same results changes nothing.

This file is the command line; the tables, plots and README section are the modules bench/harness/report_*.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "harness"))  # its modules; PYTHONSAFEPATH=1 adds no path

from report_page import markdown  # noqa: E402
from report_plots import plot_e2e, plot_kernels  # noqa: E402
from report_readme import readme_section, update_readme  # noqa: E402


def newest_results(folder: Path) -> Path:
    """The newest results file in a folder: by its recorded start time, then by name."""
    found = []
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "e2e" in data:
            found.append((str(data.get("started_at") or data.get("date") or ""), path.name, path))
    if not found:
        raise SystemExit(f"{folder}: no results JSON files")
    return max(found)[2]


def write_report(json_path: str | Path, readme: str | Path | None = None) -> dict:
    json_path = Path(json_path)
    if json_path.is_dir():
        json_path = newest_results(json_path)
    results = json.loads(json_path.read_text())
    stem = json_path.with_suffix("")
    md_path = stem.with_suffix(".md")
    written = {"json": json_path, "md": md_path}
    written["e2e_png"] = plot_e2e(results, Path(f"{stem}-e2e.png"))
    written["kernels_png"] = plot_kernels(results, Path(f"{stem}-kernels.png"))
    md_path.write_text(markdown(results, stem.name), encoding="utf-8")
    if readme:
        written["readme_changed"] = update_readme(Path(readme), readme_section(results, json_path, Path(readme)))
    return written


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("results", help="a results JSON file, or a folder (its newest results file)")
    parser.add_argument("--readme", default=None, help="refresh the section between the bench markers")
    args = parser.parse_args(argv)
    written = write_report(args.results, args.readme)
    for key, value in written.items():
        if value is not None and key != "readme_changed":
            print(f"[report] {key}: {value}")
    if args.readme:
        print(f"[report] {args.readme}: {'updated' if written['readme_changed'] else 'unchanged'}")
    return written


if __name__ == "__main__":
    main()
