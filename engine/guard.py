"""Keeping the last good state of a run, and noticing when training has gone wrong.

Three ways a run goes bad: a step's loss or gradient norm is not finite (train_step then skips the
update); an update makes the weights themselves non-finite (the next step finds them so, or the
end of the run, or a validation loss that is not finite); or training collapses to a model that
predicts the uniform distribution (loss ln(vocab), no gradient), which stays finite forever.

LastGood holds a copy of the LoRA weights and the optimizer state taken just before each update
that starts from finite weights, in device memory (the LoRA weights are small), so a bad update
can be undone and the state saved is one that evaluates finite and resumes.
"""

from __future__ import annotations

import copy
import math

import torch

from .distributed import local


def weights_finite(params: list[torch.Tensor]) -> torch.Tensor:
    """A device bool: every element of every tensor is finite (a NaN or inf anywhere makes its norm so);
    of this rank's shards when the parameters are sharded."""
    if not params:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(torch._foreach_norm([local(p).detach() for p in params])).isfinite().all()


class LastGood:
    """The LoRA weights and optimizer state of the newest step known to be good.

    keep() runs before every update, so its copies are made into buffers allocated once (a multi-tensor
    copy, no allocation or Python walk over the state per step); restore() runs once, when a run stops."""

    def __init__(self, params: list[torch.Tensor], optimizer):
        self.params, self.optimizer = params, optimizer
        self.step: int | None = None  # updates applied when the copy was taken
        self._weights: list[torch.Tensor] = []
        self._state: dict = {}  # the optimizer's state_dict, its tensors replaced by our buffers
        self._state_buffers: list[torch.Tensor] = []

    def keep(self, step: int) -> None:
        """Copy the current state: it is good, and `step` updates have been applied to it."""
        live = self.optimizer.state_dict()
        live_tensors = [local(v) for s in live["state"].values() for v in s.values() if torch.is_tensor(v)]
        if not self._state or [(t.shape, t.dtype, t.device) for t in live_tensors] != [
                (t.shape, t.dtype, t.device) for t in self._state_buffers]:
            self._state = copy.deepcopy(live)  # the state's layout changed (its first step): new buffers
            self._state_buffers = [local(v) for s in self._state["state"].values() for v in s.values()
                                   if torch.is_tensor(v)]
        with torch.no_grad():
            if not self._weights:
                self._weights = [torch.empty_like(local(p)) for p in self.params]
            torch._foreach_copy_(self._weights, [local(p).detach() for p in self.params])
            if live_tensors:
                torch._foreach_copy_(self._state_buffers, live_tensors)
        for key, entry in live["state"].items():  # values that are not tensors, if an optimizer keeps any
            self._state["state"][key].update({k: v for k, v in entry.items() if not torch.is_tensor(v)})
        self._state["param_groups"] = copy.deepcopy(live["param_groups"])
        self.step = step

    def restore(self) -> int:
        """Put the kept state back; returns its step. Raises if nothing was kept."""
        if self.step is None:
            raise RuntimeError("no good state to restore: the run went wrong before its first update")
        with torch.no_grad():
            torch._foreach_copy_([local(p).detach() for p in self.params], self._weights)
        self.optimizer.load_state_dict(copy.deepcopy(self._state))  # a copy: the optimizer must not alias ours
        for p in self.params:
            p.grad = None
        return self.step


class CollapseWatch:
    """Training collapsed when, `patience` steps in a row, the loss sits at ln(vocab) (a uniform
    prediction) with no gradient left to move it: no later step can recover."""

    def __init__(self, vocab_size: int, patience: int = 5, rel_tol: float = 1e-3, min_grad_norm: float = 1e-6):
        self.uniform_loss = math.log(vocab_size)
        self.patience, self.rel_tol, self.min_grad_norm = patience, rel_tol, min_grad_norm
        self.streak = 0

    def collapsed(self, loss: float, grad_norm: float) -> bool:
        stuck = abs(loss - self.uniform_loss) <= self.rel_tol * self.uniform_loss and grad_norm < self.min_grad_norm
        self.streak = self.streak + 1 if stuck else 0
        return self.streak >= self.patience


class OverfitWatch:
    """Overfitting: the validation loss rose at each of the last two evaluations while the training loss (the
    mean over the steps since the evaluation before) fell. Not an error, so it is said once, as a warning."""

    def __init__(self):
        self.history: list[tuple[float, float]] = []  # (mean training loss since the evaluation before, validation)
        self._since: list[float] = []
        self.warned = False

    def train_loss(self, loss: float) -> None:
        self._since.append(loss)

    def evaluated(self, val_loss: float, patience: int, best_dir) -> str | None:
        """The warning to give after this evaluation, if any."""
        train = sum(self._since) / len(self._since) if self._since else math.nan
        self._since = []
        self.history.append((train, val_loss))
        if self.warned or len(self.history) < 3:
            return None
        (t0, v0), (t1, v1), (t2, v2) = self.history[-3:]
        if not (v0 < v1 < v2 and t0 > t1 > t2):
            return None
        self.warned = True
        stopping = (f"early stopping (train.early_stopping_patience={patience}) stops the run" if patience else
                    "set train.early_stopping_patience (e.g. 2) to stop the run")
        return (f"the validation loss rose for two evaluations ({v0:.4f} -> {v1:.4f} -> {v2:.4f}) while the training "
                f"loss fell ({t0:.4f} -> {t1:.4f} -> {t2:.4f}): overfitting; {stopping} when it keeps rising; the "
                f"adapter with the best validation loss is kept in {best_dir}")


@torch.no_grad()
def finite_after_update(prepared, micro_batches, params: list[torch.Tensor]) -> bool:
    """After the run's last update, which no later step checks: finite weights, and a finite loss on the
    first micro-batch of the last step (a forward only)."""
    from .forward import packed_loss

    was_training = prepared.model.training
    prepared.model.eval()
    loss = packed_loss(prepared, micro_batches[0].to(prepared.device), reduction="sum")  # every rank: sharded,
    prepared.model.train(was_training)                                                   # they gather together
    return bool(weights_finite(params)) and bool(torch.isfinite(loss))
