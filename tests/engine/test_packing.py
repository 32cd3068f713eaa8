"""Packing: best-fit decreasing into token budgets; aligned labels, per-document positions."""

import numpy as np
import pytest
import torch

from lorafuse.engine.data import Document
from lorafuse.engine.packing import IGNORE_INDEX, best_fit_decreasing, make_batch, pack


def random_docs(n, rng, max_len=50):
    docs = []
    for _ in range(n):
        length = int(rng.integers(1, max_len + 1))
        docs.append(Document(rng.integers(3, 1000, length), rng.random(length) < 0.6))
    return docs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_decreasing_respects_capacity_and_places_every_item_once(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(1, 100, 300)]
    bins = best_fit_decreasing(lengths, 128, tie_break_seed=seed)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # Best fit decreasing needs at most 11/9 OPT + 6/9 bins; OPT >= total / capacity.
    assert len(bins) <= 11 / 9 * np.ceil(sum(lengths) / 128) + 1


def test_document_over_budget_is_an_error():
    with pytest.raises(ValueError, match="exceeds the micro-batch budget"):
        best_fit_decreasing([10, 300], 128)


@pytest.mark.parametrize("seed", [0, 5])
def test_packed_batches_lose_no_token_and_keep_invariants(seed):
    rng = np.random.default_rng(seed)
    docs = random_docs(120, rng)
    batches = pack(docs, 160, seed=seed, shuffle=True)
    seen = []
    for b in batches:
        assert b.num_tokens <= 160
        cu = b.cu_seqlens.tolist()
        assert b.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == b.num_tokens
        lengths = np.diff(cu)
        assert lengths.tolist() == b.doc_lengths and b.max_seqlen == max(lengths)
        for start, end in zip(cu[:-1], cu[1:]):
            assert b.position_ids[start:end].tolist() == list(range(end - start))
            assert b.labels[end - 1] == IGNORE_INDEX  # no document predicts its neighbour
            seen.append(tuple(b.input_ids[start:end].tolist()))
        assert b.num_target_tokens == int((b.labels != IGNORE_INDEX).sum())
    assert sorted(seen) == sorted(tuple(d.input_ids.tolist()) for d in docs)


def test_labels_are_the_next_trained_token():
    doc = Document(np.array([10, 11, 12, 13, 14]), np.array([False, False, True, True, False]))
    b = make_batch([doc, Document(np.array([7]), np.array([True]))])
    # position i targets token i+1 when token i+1 is trained
    assert b.labels.tolist() == [IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0]
    assert b.num_target_tokens == 2


def test_pin_memory_pins_every_tensor_and_keeps_the_host_counts(monkeypatch):
    batch = make_batch(random_docs(4, np.random.default_rng(3)))
    pinned_ptrs = []

    def fake_pin(t):  # pinning needs a GPU; what matters here is which tensors are pinned
        copy = t.clone()
        pinned_ptrs.append(copy.data_ptr())
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    pinned = batch.pin_memory()
    tensors = [pinned.input_ids, pinned.labels, pinned.position_ids, pinned.cu_seqlens]
    assert sorted(t.data_ptr() for t in tensors) == sorted(pinned_ptrs)
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(pinned, name), getattr(batch, name))
        assert getattr(pinned, name).dtype == getattr(batch, name).dtype
    assert (pinned.max_seqlen, pinned.num_target_tokens, pinned.doc_lengths) == \
        (batch.max_seqlen, batch.num_target_tokens, batch.doc_lengths)


@pytest.mark.gpu
def test_pinned_batch_moves_to_the_gpu_unchanged():
    batch = make_batch(random_docs(4, np.random.default_rng(4)))
    pinned = batch.pin_memory()
    assert pinned.input_ids.is_pinned() and pinned.cu_seqlens.is_pinned()
    moved = pinned.to("cuda")
    torch.cuda.synchronize()
    assert moved.input_ids.is_cuda and torch.equal(moved.labels.cpu(), batch.labels)
