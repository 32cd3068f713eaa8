"""The README's results section (between `<!-- bench:start -->` and `<!-- bench:end -->`): the newest
end-to-end table, the plot links and the command to reproduce; refreshing it with the same results changes
nothing."""

from __future__ import annotations

import os
from pathlib import Path

from report_e2e import e2e_with_goals, max_context_table
from report_page import commands

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def readme_section(results: dict, json_path: Path, readme: Path) -> str:
    """What goes between the README's markers: the newest end-to-end table, plot links, the command."""
    base = readme.resolve().parent

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), base)).as_posix()

    stem = json_path.with_suffix("")
    lines = [f"Newest results: {results.get('gpu') or 'no GPU'}, {results.get('date', '?')} "
             f"([`{rel(json_path)}`]({rel(json_path)}), details in [`{rel(stem.with_suffix('.md'))}`]"
             f"({rel(stem.with_suffix('.md'))})).", ""]
    lines += e2e_with_goals(results)
    if results.get("max_context"):
        lines += ["Max context (largest single document that trains):", ""] + max_context_table(results) + [""]
    e2e_png = Path(f"{stem}-e2e.png")
    kernels_png = Path(f"{stem}-kernels.png")
    if e2e_png.is_file():
        lines += [f"![end to end]({rel(e2e_png)})", ""]
    if kernels_png.is_file():
        lines += [f"![kernels]({rel(kernels_png)})", ""]
    lines += ["Reproduce on one GPU (about 10 minutes; writes `bench/results/<gpu>-<date>.json`, the tables and "
              "the plots):", "", "```", *commands(results),
              "```"]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, section: str) -> bool:
    """Replace the text between the markers; True if the file changed."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise SystemExit(f"{readme}: markers {START} and {END} not found (in that order); add them where the "
                         "results should go")
    new = text[:start + len(START)] + "\n" + section + text[end:]
    if new == text:
        return False
    readme.write_text(new, encoding="utf-8")
    return True
