"""The end-to-end benchmark's data: one seeded stream of documents cut into steps of an exact number of
tokens, the same for every system and every process (and the single documents of the max-context probes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lorafuse.engine.data import Document

FIRST_TOKEN = 3  # random token ids start here (below: what tokenizers use for pad/bos/eos)


@dataclass
class DataMix:
    median: float = 400.0
    sigma: float = 1.0
    max_len: int = 4096
    min_len: int = 16


def make_steps(n_steps: int, tokens_per_step: int, vocab_size: int, mix: DataMix, seed: int) -> list[list]:
    """n_steps lists of Documents of exactly tokens_per_step tokens each, every token trained.

    Document lengths are lognormal (median mix.median, sigma mix.sigma) clipped to [min_len, max_len]; a
    document that does not fit the rest of a step is split, its tail opening the next step. The stream
    depends only on the arguments, so every system and every process sees the same steps.
    """
    rng = np.random.default_rng(seed)
    steps: list[list] = []
    current: list[np.ndarray] = []
    room = tokens_per_step
    pending: np.ndarray | None = None
    while len(steps) < n_steps:
        if pending is None:
            n = int(np.clip(round(rng.lognormal(math.log(mix.median), mix.sigma)), mix.min_len, mix.max_len))
            pending = rng.integers(FIRST_TOKEN, vocab_size, n, dtype=np.int64)
        take = min(room, len(pending))
        current.append(pending[:take])
        pending = pending[take:] if take < len(pending) else None
        room -= take
        if room == 0:
            steps.append([Document(ids, np.ones(len(ids), dtype=bool)) for ids in current])
            current, room = [], tokens_per_step
    return steps


def single_document(tokens: int, vocab_size: int, seed: int):
    """One document of `tokens` random tokens (the max-context probe)."""
    ids = np.random.default_rng([seed, tokens]).integers(FIRST_TOKEN, vocab_size, tokens, dtype=np.int64)
    return Document(ids, np.ones(tokens, dtype=bool))


def target_tokens(docs) -> int:
    """Tokens the loss is taken over: every trained token but each document's first."""
    return int(sum(d.trained[1:].sum() for d in docs))
