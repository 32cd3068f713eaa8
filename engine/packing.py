"""Padding-free packing: documents into token-budget micro-batches, one flat stream each.

A micro-batch holds whole documents back to back, with no pad token anywhere:
  input_ids    [T]  the documents' tokens
  labels       [T]  labels[i] is the target of position i: the next token of the same document
                    when that token is trained, else -100; -100 at each document's last position,
                    so no document learns to predict its neighbour
  position_ids [T]  0, 1, ... restarting at each document (RoPE per document)
  cu_seqlens   [B+1] int32 document boundaries; max_seqlen the longest document (host int)
Everything is computed on the host, so the model never needs a device sync to read them.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch

from .data import Document

IGNORE_INDEX = -100


def best_fit_decreasing(lengths: list[int], capacity: int, tie_break_seed: int | None = None) -> list[list[int]]:
    """Bins of item indices, each bin's total length <= capacity.

    Items go in decreasing length, each into the fullest bin that still has room for it (best
    fit), else a new bin. Equal lengths are taken in a seeded random order when tie_break_seed
    is given, so epochs differ in which documents share a micro-batch.
    """
    order = list(range(len(lengths)))
    if tie_break_seed is not None:
        random.Random(tie_break_seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a document of {n} tokens exceeds the micro-batch budget of {capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            bins.append([i])
            left, b = capacity - n, len(bins) - 1
        else:
            left, b = room.pop(k)
            bins[b].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, b))
    return bins


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # int64 [T]
    labels: torch.Tensor  # int64 [T]
    position_ids: torch.Tensor  # int64 [T]
    cu_seqlens: torch.Tensor  # int32 [B+1]
    max_seqlen: int
    num_target_tokens: int  # labels != -100, counted on the host
    doc_lengths: list[int]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def _map(self, fn) -> PackedBatch:
        return dataclasses.replace(self, input_ids=fn(self.input_ids), labels=fn(self.labels),
                                   position_ids=fn(self.position_ids), cu_seqlens=fn(self.cu_seqlens))

    def to(self, device) -> PackedBatch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> PackedBatch:
        """Page-locked host copies: a later .to("cuda") then copies without blocking the host."""
        return self._map(torch.Tensor.pin_memory)


def doc_labels(doc: Document) -> np.ndarray:
    labels = np.full(len(doc), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(doc.trained[1:], doc.input_ids[1:], IGNORE_INDEX)
    return labels


def make_batch(docs: list[Document]) -> PackedBatch:
    lengths = [len(d) for d in docs]
    input_ids = np.concatenate([d.input_ids for d in docs])
    labels = np.concatenate([doc_labels(d) for d in docs])
    position_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    cu_seqlens = np.zeros(len(docs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=max(lengths),
        num_target_tokens=int((labels != IGNORE_INDEX).sum()),
        doc_lengths=lengths,
    )


def pack(docs: list[Document], max_tokens: int, seed: int | None = None, shuffle: bool = False) -> list[PackedBatch]:
    """Pack documents into micro-batches of at most max_tokens tokens.

    With shuffle, the micro-batches come in a seeded random order (the packing itself always
    groups long documents first, so unshuffled order runs from the fullest batch to the emptiest).
    """
    bins = best_fit_decreasing([len(d) for d in docs], max_tokens, tie_break_seed=seed)
    if shuffle:
        random.Random(seed).shuffle(bins)
    # Within a micro-batch keep the documents in file order: easier to read when debugging.
    return [make_batch([docs[i] for i in sorted(b)]) for b in bins]
