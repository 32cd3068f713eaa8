"""The max-context search (bench/harness/e2e_max_context.py), its logic without a GPU."""

from e2e_max_context import max_context_search
from harness_utils import FakeRunner


def test_max_context_search_doubles_then_bisects_and_respects_the_deadline():
    partial = []
    found = max_context_search(FakeRunner(1500), 256, start=256, granularity=64, limit=1 << 20,
                               deadline=float("inf"), seed=0, log=lambda *_: None, progress=partial.append)
    assert found["largest_tokens"] == 1472 and found["first_failure"] == 1536 and found["limited_by"] == "memory"
    assert [p["tokens"] for p in found["probes"]][:4] == [256, 512, 1024, 2048]
    assert partial[-1]["largest_tokens"] == 1472 and len(partial) == len(found["probes"])
    late = max_context_search(FakeRunner(1500), 256, start=256, granularity=64, limit=1 << 20, deadline=0.0,
                              seed=0, log=lambda *_: None)
    assert late["largest_tokens"] == 0 and late["limited_by"] == "time" and not late["probes"]
