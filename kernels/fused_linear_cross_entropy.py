"""Cross-entropy of a linear head without materialising the [N, V] logits.

For rows i with labels[i] != ignore_index, logits z_i = W h_i (+ b), and
  loss_i = logsumexp(z_i) - z_i[y_i]
  d loss_i / d z_i = softmax(z_i) - onehot(y_i)
so dH = G W and dW = G^T H, with G the [N, V] logit gradient, never held whole: rows are taken
in chunks, each chunk's logits and gradient live only while that chunk is processed, and the
gradients of H and W are accumulated in the forward (backward only scales them by the
incoming gradient).

"mean" divides by the number of non-ignored labels (kept on the device: no sync); with none,
the loss and gradients are 0. "sum" is the plain sum.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk


def _chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, CHUNK_BYTES // (4 * vocab)))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The PyTorch reference: the math above, chunked over rows, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index: int, reduction: str):
        n_rows = hidden.shape[0]
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        step = _chunk_rows(n_rows, weight.shape[0])
        for start in range(0, n_rows, step):
            h = hidden[start:start + step]
            y = labels[start:start + step]
            logits = (h @ weight.T).to(acc)
            if bias is not None:
                logits = logits + bias.to(acc)
            keep = y != ignore_index
            target = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None])[:, 0]
            loss += torch.where(keep, lse - picked, 0).sum()
            grad_logits = torch.softmax(logits, dim=-1)
            grad_logits[torch.arange(len(y), device=y.device), target] -= 1
            grad_logits *= keep[:, None]
            if need_h:
                grad_h[start:start + step] = (grad_logits.to(hidden.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += grad_logits.T @ h.to(acc)
            if need_b:
                grad_b += grad_logits.sum(0)
        if reduction == "mean":
            scale = 1.0 / (labels != ignore_index).sum().clamp(min=1).to(acc)
            loss = loss * scale
            grad_h = grad_h * scale.to(hidden.dtype) if need_h else None
            grad_w = grad_w * scale if need_w else None
            grad_b = grad_b * scale if need_b else None
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None,
                              grad_b.to(bias.dtype) if need_b else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)
        return scale(grad_h), scale(grad_w), None, scale(grad_b), None, None


def fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index=-100, reduction="mean", bias=None):
    return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, bias, ignore_index, reduction)


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean",
                               bias=None):
    """Loss of logits hidden @ weight.T (+ bias) against labels, never building [N, V] logits.

    hidden [N, H]; weight [V, H]; labels [N] int64, aligned (labels[i] is the target of row i).
    Returns a float32 scalar (float64 for float64 inputs).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, H] and labels [N]; got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    return fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index, reduction, bias)
