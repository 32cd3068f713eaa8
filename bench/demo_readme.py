"""The README's demo section, generated from the recorded run of `lorafuse demo`.

    python bench/demo_readme.py --record demo_out     # keep a finished demo's results, loss plot and a
                                                      # screenshot of its report in bench/results/
    python bench/demo_readme.py                       # rewrite the README between the demo markers

--record copies demo_out/demo_results.json to bench/results/demo-smollm2-cpu-<date>.json, the loss curve beside
it (-loss.png), and takes a screenshot of demo_out/report.html in headless Chromium (-report.png). The README
section always comes from the newest such file, so a figure in the README is one in a results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- demo:start -->", "<!-- demo:end -->"
PREFIX = "demo-smollm2-cpu-"


def record(demo_out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "bench" / "harness"))
    import headless_browser

    summary = json.loads((demo_out / "demo_results.json").read_text())
    stem = RESULTS / f"{PREFIX}{datetime.date.today().isoformat()}"
    shutil.copyfile(demo_out / "adapter" / "loss.png", f"{stem}-loss.png")
    if reason := headless_browser.missing():
        raise SystemExit(f"cannot take the report's screenshot: {reason}")
    driver = headless_browser.start(width=1280, height=900)
    try:
        driver.get((demo_out / "report.html").resolve().as_uri())
        driver.save_screenshot(f"{stem}-report.png")
    finally:
        driver.quit()
    summary["files"] = {"loss_plot": f"{stem.name}-loss.png", "report_screenshot": f"{stem.name}-report.png"}
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"recorded {path} with {stem.name}-loss.png and {stem.name}-report.png")
    return path


def section(path: Path) -> str:
    s = json.loads(path.read_text())
    b, f, g, t, d = s["base"], s["finetuned"], s["forgetting"], s["times_s"], s["data"]
    env = s["environment"]
    load = s.get("load_average_before")
    rel = path.relative_to(ROOT)
    lines = [
        f"The run recorded in [`{rel}`]({rel}) ({env['cpu_threads']} CPU threads, torch {env['torch']}"
        + (f", load average {load[0]:.2f} when it started" if load else "") + f"): {s['model']}, LoRA r="
        f"{s['settings']['r']} on every projection, {s['settings']['epochs']} epoch over {d['train']} tickets "
        f"({s['train_steps']} steps), took **{t['demo_without_import']:.0f} s** without the one-time import "
        + (f"({t['import']:.0f} s)" if t["import"] else "(done by an earlier run)")
        + (f", of which {t['replay_answers']:.0f} s the base model's replay answers (generated once, then cached)"
           if t.get("replay_answers") else "")
        + f": training with the forgetting check {t['train_with_forgetting_check']:.0f} s, the "
        f"held-out comparison {t['held_out_eval']:.0f} s.",
        "",
        "| | base | fine-tuned |",
        "|---|---|---|",
        f"| exact match on {d['test']} held-out tickets | {b['accuracy']:.1%} | {f['accuracy']:.1%} |",
        f"| loss on their answer tokens | {b['loss']:.2f} | {f['loss']:.2f} |",
    ]
    if g:
        lines += [f"| general answers word for word the same ({g['prompts']} prompts outside the task) | (the "
                  f"reference) | {g['unchanged']} of {g['prompts']} |",
                  f"| positions of the base's general answers where the base's token is still the first choice "
                  f"| {g['base_token_agreement']:.1%} | {g['token_agreement']:.1%} |",
                  f"| loss on the base model's general answers | {g['base_loss_on_base_answers']:.2f} | "
                  f"{g['finetuned_loss_on_base_answers']:.2f} |"]
    files = s.get("files", {})
    if files:
        lines += ["", f"![training loss](bench/results/{files['loss_plot']})",
                  f"![the side-by-side report](bench/results/{files['report_screenshot']})"]
    return "\n".join(lines)


def newest() -> Path:
    found = sorted(RESULTS.glob(f"{PREFIX}*.json"))
    if not found:
        raise SystemExit(f"no {PREFIX}*.json in {RESULTS}: record a demo run first (--record demo_out)")
    return found[-1]


def write_readme(readme: Path, path: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section(path)}\n{END}{tail}")
    print(f"{readme}: demo section from {path.relative_to(ROOT)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", metavar="DEMO_OUT", help="a finished demo's output directory to record first")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    args = p.parse_args(argv)
    path = record(Path(args.record)) if args.record else newest()
    write_readme(Path(args.readme), path)


if __name__ == "__main__":
    main()
