"""Held-out evaluation: loss and perplexity on target tokens, and exact-match accuracy of
generated answers (greedy decoding through HF's generate)."""

from __future__ import annotations

import math
import sys

import torch

from .data import Example
from .distributed import DistContext, all_reduce_sum
from .forward import packed_loss
from .packing import PackedBatch
from .prepare import PreparedModel


@torch.no_grad()
def evaluate_loss(prepared: PreparedModel, batches: list[PackedBatch], ctx: DistContext | None = None) -> dict:
    """Mean loss per target token over all batches, and its perplexity. Data-parallel ranks each
    take their share of the batches and sum the results."""
    ctx = ctx or DistContext()
    model, device = prepared.model, prepared.device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches[ctx.rank::ctx.world]:
        total += packed_loss(prepared, batch.to(device), reduction="sum").double()
    model.train(was_training)
    targets = sum(b.num_target_tokens for b in batches)
    loss = all_reduce_sum(total, ctx).item() / max(targets, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "target_tokens": targets}


def prompt_and_answer(ex: Example, tokenizer) -> tuple[str, str]:
    """The text the model is given and the reference answer it should produce: for chat form, the
    conversation up to its last assistant turn (with the generation prompt) and that turn."""
    if ex.messages is not None:
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(ex.messages[:last], tokenize=False, add_generation_prompt=True)
        return prompt, ex.messages[last]["content"]
    return ex.prompt, ex.completion


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[Example], max_new_tokens: int = 32, batch_size: int = 32,
                     progress: bool = True) -> list[str]:
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    show_bar = progress and sys.stderr.isatty()
    for start in tqdm(range(0, len(examples), batch_size), desc="generate", disable=not show_bar, leave=False):
        chunk = examples[start:start + batch_size]
        ids = [tokenizer(prompt_and_answer(ex, tokenizer)[0], add_special_tokens=ex.messages is None)["input_ids"]
               for ex in chunk]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


def exact_match(predictions: list[str], references: list[str]) -> float:
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return hits / max(len(references), 1)
