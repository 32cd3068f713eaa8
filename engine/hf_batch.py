"""HF-style model inputs as one PackedBatch: what a patched model's forward (patch.py) runs on.

Three layouts come in, each read as HF's own forward reads it:
  padded          input_ids [B, S] with attention_mask: each row's unmasked tokens are one document;
                  padding is skipped, not computed
  padding-free    input_ids [1, T] without attention_mask (transformers' DataCollatorWithFlattening,
                  TRL's padding_free): a new document wherever position_ids do not go up by one
                  (HF's rule), or at the boundaries of the cu_seq_lens_q keyword argument
  plain           input_ids [B, S], nothing else: each row is one document
Positions are HF's: position_ids when given, else 0..S-1 per row.

Labels follow HF's convention: unshifted, -100 ignored. HF shifts each row by one (the target of position
s is labels[s + 1], the row's last position has none), so the shift is done on the [B, S] grid before
padding is dropped; `shift_labels` (already shifted) is taken as it is. A padding position is no target.

Everything is computed on the host from the small index tensors (one copy of the mask, positions and
labels), so the PackedBatch is the engine's: cu_seqlens and max_seqlen are host values.
"""

from __future__ import annotations

import torch

from .packing import IGNORE_INDEX, PackedBatch


def _grid(t: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """t [B, S] or [1, S] (broadcast to B rows) on the host; None stays None."""
    if t is None:
        return None
    t = t.detach().to("cpu")
    if t.dim() == 1:
        t = t[None]
    return t.expand(shape)


def packed_from_hf(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None,
                   ) -> tuple[PackedBatch, torch.Tensor | None]:
    """The PackedBatch (on the host) of a HF forward's inputs, and the flat [B*S] indices of its tokens
    (None when every position is a token), to scatter per-token results back to the [B, S] grid."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    shape = input_ids.shape
    rows, width = shape
    mask = _grid(attention_mask, shape)
    positions = _grid(position_ids, shape)
    if positions is None:
        positions = torch.arange(width).expand(shape)
    if shift_labels is not None:
        targets = _grid(shift_labels, shape)
    elif labels is not None:
        labels = _grid(labels, shape)
        targets = torch.cat([labels[:, 1:], torch.full((rows, 1), IGNORE_INDEX, dtype=labels.dtype)], dim=1)
    else:
        targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)

    if mask is not None:
        keep = mask.bool()
        lengths = keep.sum(dim=1)
        lengths = lengths[lengths > 0].tolist()
    elif cu_seq_lens is not None:
        bounds = cu_seq_lens.detach().to("cpu", torch.long)
        if bounds[0] != 0 or bounds[-1] != rows * width:
            raise ValueError(f"cu_seq_lens_q must run from 0 to the {rows * width} tokens of input_ids; got "
                             f"{bounds[0].item()} .. {bounds[-1].item()}")
        keep, lengths = None, [n for n in bounds.diff().tolist() if n > 0]
    else:
        keep = None
        starts = torch.ones(shape, dtype=torch.bool)
        if position_ids is not None:  # HF's packed-sequence rule: a document starts where positions jump
            starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        flat_starts = starts.reshape(-1).nonzero().flatten().tolist() + [rows * width]
        lengths = [b - a for a, b in zip(flat_starts[:-1], flat_starts[1:])]

    index = keep.reshape(-1).nonzero().flatten() if keep is not None and not bool(keep.all()) else None
    pick = (lambda t: t.reshape(-1)[index]) if index is not None else (lambda t: t.reshape(-1))
    flat_labels = pick(targets).to(torch.long)
    flat_ids = input_ids.reshape(-1)
    if index is not None:
        flat_ids = flat_ids[index.to(flat_ids.device)]
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    batch = PackedBatch(input_ids=flat_ids, labels=flat_labels, position_ids=pick(positions).to(torch.long),
                        cu_seqlens=cu_seqlens, max_seqlen=max(lengths, default=0),
                        num_target_tokens=int((flat_labels != IGNORE_INDEX).sum()), doc_lengths=lengths)
    return batch, index
