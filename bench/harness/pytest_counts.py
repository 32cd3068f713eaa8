"""Pass / fail / skip counts and the failed ids of a pytest run, from its --junitxml file or, when the run
was killed before writing it, from its -v output (the tests and kernels stages of bench/run.py)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

_RESULT_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def parse_junit(path: Path) -> dict | None:
    """Counts and failed test ids of a pytest --junitxml file (None if it is missing or unreadable)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed_ids = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failed_ids.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failed_ids.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    counts["total"] = sum(counts.values())
    counts["failed_ids"] = failed_ids
    return counts


def parse_verbose_output(text: str) -> dict:
    """Counts from pytest -v lines (used when the run was killed before writing its junit file)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed_ids = []
    for line in text.splitlines():
        match = _RESULT_LINE.match(line.strip())
        if not match:
            continue
        outcome = match.group(2)
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(outcome, "skipped")
        counts[key] += 1
        if key in ("failed", "errors"):
            failed_ids.append(match.group(1))
    counts["total"] = sum(counts.values())
    counts["failed_ids"] = failed_ids
    return counts
