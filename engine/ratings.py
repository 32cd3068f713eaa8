"""`lorafuse eval --ratings FILE...`: summarise the ratings exported from a side-by-side report (report_html.py).

Per adapter (and section of the report): how many answers were rated better, the same and worse than the
base model's, and the win rate: better / (better + worse), the ties left out, with its 95% Wilson score
interval (honest at small counts and at 0% or 100%, where the normal approximation is not). Several files
(several raters, or one rater's sessions) are pooled; a rating of the same row by the same rater twice
counts once (the later file wins).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .report_html import FORMAT, RATINGS


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96); (0, 1) without trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def read_ratings(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"ratings file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("ratings"), list):
        raise ValueError(f"{path}: not ratings exported from a lorafuse report (format {FORMAT!r})")
    for i, r in enumerate(data["ratings"]):
        if not isinstance(r, dict) or r.get("rating") not in RATINGS or not r.get("row") or not r.get("system"):
            raise ValueError(f"{path}: ratings[{i}]: needs row, system and a rating among {', '.join(RATINGS)}")
    return data


def summarise(paths: list[str | Path]) -> dict:
    """{"reports": [...], "raters": [...], "systems": {"SYSTEM [section]": counts, win rate, interval}}."""
    latest: dict[tuple, dict] = {}
    reports, raters = set(), set()
    for path in paths:
        data = read_ratings(path)
        reports.add(data.get("report"))
        rater = data.get("rater") or str(path)
        raters.add(rater)
        for r in data["ratings"]:
            latest[(data.get("report"), rater, r["row"], r["system"])] = r
    groups: dict[str, dict] = {}
    for r in latest.values():
        label = r["system"] + (f" [{r['section']}]" if r.get("section") else "")
        counts = groups.setdefault(label, dict.fromkeys(RATINGS, 0))
        counts[r["rating"]] += 1
    out = {}
    for label, c in sorted(groups.items()):
        decided = c["better"] + c["worse"]
        low, high = wilson_interval(c["better"], decided)
        n = sum(c.values())
        nw_low, nw_high = wilson_interval(c["better"] + c["same"], n)
        out[label] = {**c, "rated": n, "win_rate": c["better"] / decided if decided else None,
                      "win_rate_ci95": [low, high], "not_worse": (c["better"] + c["same"]) / n,
                      "not_worse_ci95": [nw_low, nw_high]}
    return {"reports": sorted(x for x in reports if x), "raters": sorted(raters), "systems": out}


def summary_lines(summary: dict) -> list[str]:
    lines = [f"ratings of {len(summary['raters'])} rater(s) on {len(summary['reports'])} report(s); win rate = "
             "better / (better + worse), 95% Wilson interval", "",
             f"  {'adapter [section]':32}{'rated':>6}{'better':>8}{'same':>6}{'worse':>7}   {'win rate':>8}  "
             f"{'95% CI':15}  not worse"]
    for label, s in summary["systems"].items():
        win = "-" if s["win_rate"] is None else f"{s['win_rate']:.0%}"
        low, high = s["win_rate_ci95"]
        lines.append(f"  {label:32}{s['rated']:>6}{s['better']:>8}{s['same']:>6}{s['worse']:>7}   {win:>8}  "
                     f"{f'{low:.0%} - {high:.0%}':15}  {s['not_worse']:.0%}")
    return lines
