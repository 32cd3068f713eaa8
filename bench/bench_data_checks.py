"""The data gate's cost at scale: `lorafuse data check` on a generated file of a million lines, one core.

The file is chat and prompt/completion lines of random words (a Zipf vocabulary of 50,000 made-up words
of 2 to 10 letters, an order number or an amount in one line of three, prompts of 20 to 80 words, answers
from 12 labels or short sentences), with planted exact duplicates, near copies (one word changed),
personal data, and validation / test files that copy a few training examples. Timed:
reading and validating (data.read_jsonl, as `data check` and `train` do), and the checks (data_checks:
normalised keys, MinHash/LSH near duplicates with exact verification, leakage, conflicts, PII, shape).
The results file has what was planted beside what was found (a near copy of an example with copies, or
a copy of a PII line, is found more than once; leakage also counts validation/test examples that
nearly repeat a training one by chance).

    python bench/bench_data_checks.py       # 1,000,000 lines -> bench/results/data-checks-cpu-<date>.json
    python bench/bench_data_checks.py --lines 20000 --out /tmp/dc.json

Nothing is asserted about the time; the suite runs a small smoke version (test_smoke).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

LABELS = ["billing", "refund", "shipping", "damaged", "login", "password", "bug", "feature", "cancel", "order",
          "product", "privacy"]
PII = ["write to jane.roe@example.org", "call +1 415 555 0133", "card 4242 4242 4242 4242",
       "IBAN GB82 WEST 1234 5698 7654 32", "from 203.0.113.7", "key AKIAIOSFODNN7EXAMPLE"]


def generate(folder: Path, lines: int, seed: int = 0) -> tuple[dict[str, Path], dict[str, int]]:
    """train.jsonl of `lines` lines (1% exact duplicates, 1% near copies, 0.1% with personal data), and
    validation.jsonl / test.jsonl of lines // 100 each, 2% of them (and the first) copied from train;
    and how many of each were planted."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    vocab = ["".join(rng.choices(letters, weights=range(26, 0, -1), k=rng.randint(2, 10))) for _ in range(50_000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    pool = rng.choices(vocab, weights, k=200_000)  # drawn once: Zipf-distributed words, cheap to sample

    def text(n: int) -> str:
        start = rng.randrange(len(pool) - n)
        words = pool[start:start + n]
        rng.shuffle(words)
        return " ".join(words)

    def example() -> dict:
        prompt = text(rng.randint(20, 80))
        if rng.random() < 0.33:
            prompt += rng.choice([f" order #{rng.randint(10000, 99999)}", f" for ${rng.randint(5, 400)}.99"])
        answer = rng.choice(LABELS) if rng.random() < 0.5 else text(rng.randint(3, 12))
        if rng.random() < 0.5:
            return {"prompt": prompt, "completion": answer}
        return {"messages": [{"role": "system", "content": "Answer the question."},
                             {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}

    def near(row: dict) -> dict:
        row = json.loads(json.dumps(row))
        target = row["messages"][1] if "messages" in row else row
        key = "content" if "messages" in row else "prompt"
        words = target[key].split()
        words[rng.randrange(len(words))] = "changed"
        target[key] = " ".join(words)
        return row

    train, planted = [], {"duplicates": 0, "near_copies": 0, "pii_lines": 0}
    for _ in range(lines):
        r = rng.random()
        if train and r < 0.01:
            train.append(rng.choice(train))
            planted["duplicates"] += 1
        elif train and r < 0.02:
            train.append(near(rng.choice(train)))
            planted["near_copies"] += 1
        else:
            row = example()
            if r > 0.999:
                planted["pii_lines"] += 1
                (row["messages"][1] if "messages" in row else row).__setitem__(
                    "content" if "messages" in row else "prompt", text(20) + " " + rng.choice(PII))
            train.append(row)
    files = {"train": train}
    for split in ("validation", "test"):
        copied = [n == 0 or rng.random() < 0.02 for n in range(max(1, lines // 100))]
        files[split] = [rng.choice(train) if c else example() for c in copied]
        planted[f"{split}_copies"] = sum(copied)
    paths = {}
    for split, rows in files.items():
        paths[split] = folder / f"{split}.jsonl"
        with open(paths[split], "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    return paths, planted


def run(lines: int, folder: Path) -> dict:
    from lorafuse.engine.config import DataChecks
    from lorafuse.engine.data import read_jsonl
    from lorafuse.engine.data_checks import Source, check_data, levels_of

    t0 = time.perf_counter()
    paths, planted = generate(folder, lines)
    generated = time.perf_counter() - t0
    t0 = time.perf_counter()
    sources = [Source(split, str(path), read_jsonl(path)[0]) for split, path in paths.items()]
    read_s = time.perf_counter() - t0
    report = check_data(sources, levels_of(DataChecks()))
    found = {f.kind + (f":{f.summary.split()[1]}" if f.kind == "pii" else ""): f.count for f in report.findings}
    return {"lines": {split: len(s.examples) for split, s in zip(paths, sources)},
            "bytes": {split: path.stat().st_size for split, path in paths.items()},
            "generate_s": round(generated, 2), "read_s": round(read_s, 2), "check_s": round(report.seconds, 2),
            "planted": planted, "found": found,
            "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=1_000_000, help="training lines (default 1,000,000)")
    p.add_argument("--out", help="results JSON (default bench/results/data-checks-cpu-<date>.json)")
    args = p.parse_args(argv)
    import torch  # only for the thread count the run had (none of the checks uses torch)

    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.lines, Path(tmp))
    date = datetime.date.today().isoformat()
    result.update(command="python bench/bench_data_checks.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
                  date=date, environment={"python": platform.python_version(), "machine": platform.machine(),
                                          "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
                                          "torch_threads": torch.get_num_threads()})
    out = Path(args.out or Path(__file__).parent / "results" / f"data-checks-cpu-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def test_smoke(tmp_path):
    result = main(["--lines", "3000", "--out", str(tmp_path / "dc.json")])
    assert result["lines"]["train"] == 3000
    assert result["found"]["duplicates"] > 0 and result["found"]["near_duplicates"] > 0
    assert result["found"]["test_leakage"] > 0


if __name__ == "__main__":
    main()
