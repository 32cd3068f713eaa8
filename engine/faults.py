"""Crash injection for the tests that prove a killed run loses nothing.

With LORAFUSE_CRASH_AT=NAME:N in the environment, the N-th time the run passes crash_point(NAME)
the process exits at once (os._exit: no cleanup, no flush), as a kill -9 or a power cut would
leave it. Named points: "step" (after an update), "checkpoint" (inside a checkpoint write),
"adapter" (between writing an adapter's weights and renaming them into place). Unset, it is a no-op.
"""

from __future__ import annotations

import os

CRASH_EXIT_CODE = 87
_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("LORAFUSE_CRASH_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(count or 1):
        os._exit(CRASH_EXIT_CODE)
