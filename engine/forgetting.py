"""The forgetting check (config key eval.general, `lorafuse eval --general`): did fine-tuning change what the
model answers outside the task?

A file of general prompts (geography, arithmetic, writing, code: anything but the task) is answered
greedily by the base model: those answers are the reference, whatever their quality. The fine-tuned model
answers the same prompts, and the check reports its agreement with the base:
  - unchanged: answers identical to the base's (after stripping spaces), "unchanged on 47 of 50". Greedy
    answers of a small model are fragile: one different word and the rest of the answer differs, so a model
    that moved a little can change most answers while still answering in the same way;
  - token agreement: at how many positions of the base's answers the fine-tuned model's first choice is
    still the base's token (teacher forcing, every position judged on the base's own prefix);
  - the fine-tuned model's loss on the base's answers (per answer token), beside the base's own: a model
    that still gives the base's answers finds them about as likely as the base does.
When the fine-tuned model prefers another token at more than eval.general_max_change of the positions, a
warning names the usual remedies.

Lines of the file (JSONL): {"prompt": "..."} (one user turn through the chat template, the raw text when
the tokenizer has none) or {"messages": [...]} ending in a user turn (later assistant turns are ignored:
the base model's answer is the reference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import ROLES, DataError, Document

REMEDIES = ("lower train.lr, train fewer steps (train.epochs, train.max_steps), or mix general data into "
            "training (data.mix: [{path: general.jsonl, fraction: 0.1}])")


@dataclass
class GeneralPrompt:
    line: int
    messages: list[dict] | None = None
    text: str | None = None

    def shown(self) -> str:
        """The prompt as a person reads it: the last user turn (or the text)."""
        return self.text if self.messages is None else self.messages[-1]["content"]


def read_general(path: str | Path) -> list[GeneralPrompt]:
    """The prompts of a general-prompts file; a DataError naming file, line and field otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"general prompts file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
            raise DataError(f"{where}: expected an object with 'prompt' or 'messages'")
        if "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise DataError(f"{where}: field 'prompt': must be non-empty text")
            prompts.append(GeneralPrompt(number, text=row["prompt"]))
            continue
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages': must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field 'messages[{i}]': needs a role ({', '.join(ROLES)}) and text content")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise DataError(f"{where}: field 'messages': no user turn to answer")
        prompts.append(GeneralPrompt(number, messages=messages[: users[-1] + 1]))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def prompt_token_ids(tokenizer, prompt: GeneralPrompt) -> list[int]:
    if prompt.messages is None and not getattr(tokenizer, "chat_template", None):
        return tokenizer(prompt.text)["input_ids"]
    messages = prompt.messages or [{"role": "user", "content": prompt.text}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_loss(prepared, prompts: list[list[int]], answers: list[list[int]], max_tokens: int = 4096) -> float:
    """Mean loss per answer token of `answers` following `prompts`, under the model as it is now."""
    from .evaluate import evaluate_loss
    from .packing import pack

    docs = [Document(np.array(p + a, dtype=np.int64), np.array([False] * len(p) + [True] * len(a)))
            for p, a in zip(prompts, answers) if a]
    if not docs:
        return float("nan")
    return evaluate_loss(prepared, pack(docs, max(max_tokens, max(map(len, docs)))))["loss"]


@torch.no_grad()
def token_agreement(model, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """Share of the answers' tokens that are the model's own first choice (argmax) given everything before
    them (teacher forcing). Of the base model on its greedy answers it is 1 (ties aside). Unlike comparing
    free-running answers, where one different word early on changes all that follows, it measures how far the
    model moved at each position."""
    device = next(model.parameters()).device
    hits = total = 0
    for prompt, answer in zip(prompts, answers):
        if not answer:
            continue
        ids = torch.tensor([prompt + answer], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        hits += int((logits.argmax(-1) == ids[0, len(prompt):]).sum())
        total += len(answer)
    return hits / total if total else float("nan")


@dataclass
class Reference:
    """The base model's greedy answers to the general prompts, and its loss on them."""

    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    loss: float
    token_agreement: float  # the base model's own, 1 but for ties


def base_reference(prepared, tokenizer, prompts: list[GeneralPrompt], max_new_tokens: int = 48) -> Reference:
    """Run with the base model active (every adapter off): its answers are the reference."""
    from .evaluate import generate_ids

    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    answers = generate_ids(prepared.model, tokenizer, ids, max_new_tokens, desc="general: base")
    return Reference(ids, answers, answer_loss(prepared, ids, answers),
                     token_agreement(prepared.model, ids, answers))


def agreement(prepared, tokenizer, prompts: list[GeneralPrompt], reference: Reference, *, max_change: float = 0.1,
              max_new_tokens: int = 48, name: str = "fine-tuned", log=print) -> dict:
    """Run with the fine-tuned model active: its answers and its loss on the base's, against the reference."""
    from .evaluate import generate_ids

    tuned = generate_ids(prepared.model, tokenizer, reference.prompt_ids, max_new_tokens, desc=f"general: {name}")
    tuned_loss = answer_loss(prepared, reference.prompt_ids, reference.answer_ids)
    tokens_kept = token_agreement(prepared.model, reference.prompt_ids, reference.answer_ids)
    base_text = tokenizer.batch_decode(reference.answer_ids, skip_special_tokens=True)
    tuned_text = tokenizer.batch_decode(tuned, skip_special_tokens=True)
    same = [b.strip() == t.strip() for b, t in zip(base_text, tuned_text)]
    n, unchanged = len(prompts), sum(same)
    result = {
        "prompts": n, "unchanged": unchanged, "agreement": unchanged / n,
        "token_agreement": tokens_kept, "base_token_agreement": reference.token_agreement,
        "finetuned_loss_on_base_answers": tuned_loss, "base_loss_on_base_answers": reference.loss,
        "max_change": max_change, "max_new_tokens": max_new_tokens,
        "answers": [{"line": p.line, "prompt": p.shown(), "base": b, "finetuned": t, "unchanged": s}
                    for p, b, t, s in zip(prompts, base_text, tuned_text, same)],
    }
    log(f"[general] {name}: answers word for word the same on {unchanged} of {n} general prompts; the base "
        f"model's next token still its first choice at {tokens_kept:.1%} of their positions; loss on the base "
        f"model's answers: base {reference.loss:.3f}, {name} {tuned_loss:.3f}")
    if (changed := 1 - tokens_kept) > max_change:
        result["warning"] = (f"at {changed:.0%} of the positions of the base model's general answers the {name} "
                             f"model now prefers another token (more than eval.general_max_change "
                             f"{max_change:.0%}; {n - unchanged} of {n} answers changed): the adapter may be "
                             f"forgetting what the base model knew; {REMEDIES}")
        log(f"[general] warning: {result['warning']}")
    return result


def forgetting_check(prepared, tokenizer, prompts: list[GeneralPrompt], *, max_new_tokens: int = 48,
                     max_change: float = 0.1, log=print) -> dict:
    """The check at the end of training: `prepared` is the PreparedModel of the model carrying the adapter
    (LoraLinear); the base answers are taken with it turned off."""
    from .lora import adapters_disabled

    model = prepared.model
    was_training = model.training
    with adapters_disabled(model):
        reference = base_reference(prepared, tokenizer, prompts, max_new_tokens)
    result = agreement(prepared, tokenizer, prompts, reference, max_change=max_change, max_new_tokens=max_new_tokens,
                       log=log)
    model.train(was_training)
    return result
