"""Data mixing (data.mix): examples of other files join the training split at a set share of every epoch.

A source with fraction f makes up f of each epoch's training documents: with the training file's n
documents and fractions f_1..f_k, source i adds round(n * f_i / (1 - sum f)) documents per epoch. They are
drawn afresh each epoch (seeded by train.seed, the epoch and the source), without repeats while the
source has enough documents; a smaller source is repeated whole as often as it fits and the rest drawn.
Mixing in general data this way keeps a fine-tuned model from forgetting what it could do before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .data import Document


@dataclass
class MixedSource:
    path: str
    fraction: float
    docs: list[Document]
    per_epoch: int  # documents drawn each epoch


class Mixture:
    def __init__(self, sources: list[MixedSource], seed: int):
        self.sources, self.seed = sources, seed

    @classmethod
    def of(cls, train_docs: int, sources: list[tuple[str, float, list[Document]]], seed: int) -> Mixture:
        """sources: (path, fraction, tokenized documents); train_docs: documents of the training file."""
        rest = 1.0 - sum(f for _, f, _ in sources)
        mixed = [MixedSource(path, f, docs, round(train_docs * f / rest)) for path, f, docs in sources]
        return cls(mixed, seed)

    def draw(self, epoch: int) -> list[Document]:
        """This epoch's documents of every source (seeded: the same epoch draws the same documents)."""
        out: list[Document] = []
        for i, s in enumerate(self.sources):
            rng = random.Random(f"mix:{self.seed}:{epoch}:{i}")
            whole, part = divmod(s.per_epoch, len(s.docs))
            out += s.docs * whole + rng.sample(s.docs, part)
        return out

    def epoch(self, train_docs: list[Document], epoch: int) -> list[Document]:
        return train_docs + self.draw(epoch)

    def describe(self, train_docs: int) -> list[str]:
        total = train_docs + sum(s.per_epoch for s in self.sources)
        lines = []
        for s in self.sources:
            repeats = f"; it has only {len(s.docs)}, so they repeat" if s.per_epoch > len(s.docs) else ""
            lines.append(f"mix: {s.path}: {s.per_epoch} of its {len(s.docs)} examples per epoch, "
                         f"{s.per_epoch / total:.1%} of each epoch's {total} (data.mix fraction {s.fraction:g}, "
                         f"drawn afresh each epoch{repeats})")
        return lines
