"""Helpers shared by the engine tests."""

import json


def write_jsonl(path, rows):
    """Write rows (dicts, or raw str/bytes lines) as a JSONL file; returns the path."""
    with open(path, "wb") as fh:
        for row in rows:
            if isinstance(row, bytes):
                fh.write(row + b"\n")
            elif isinstance(row, str):
                fh.write(row.encode() + b"\n")
            else:
                fh.write(json.dumps(row).encode() + b"\n")
    return path
