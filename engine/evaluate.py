"""Held-out evaluation: loss and perplexity on target tokens, and exact-match accuracy of
generated answers (greedy decoding through HF's generate)."""

from __future__ import annotations

import math
import sys

import torch

from .config import DEFAULT_MAX_SEQ_LEN
from .data import Example, encode_all, read_jsonl
from .distributed import DistContext, all_reduce_sum
from .forward import packed_loss
from .packing import PackedBatch, pack
from .prepare import PreparedModel, prepare_model
from .step import rank_share


@torch.no_grad()
def evaluate_loss(prepared: PreparedModel, batches: list[PackedBatch], ctx: DistContext | None = None) -> dict:
    """Mean loss per target token over all batches, and its perplexity. Data-parallel ranks each
    take their share of the batches and sum the results."""
    ctx = ctx or DistContext()
    model, device = prepared.model, prepared.device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in rank_share(batches, ctx, sharded=prepared.sharded is not None):
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


def prompt_ids(ex: Example, tokenizer) -> list[int]:
    """The token ids of an example's prompt (prompt_and_answer), as generation is given them."""
    return tokenizer(prompt_and_answer(ex, tokenizer)[0], add_special_tokens=ex.messages is None)["input_ids"]


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 32, batch_size: int = 32,
                 progress: bool = True, desc: str = "generate") -> list[list[int]]:
    """Greedy continuations of token-id prompts, each up to and including its end-of-sequence token when it
    produced one. Prompts are batched by length (less padding), left-padded, and returned in their order."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    show_bar = progress and sys.stderr.isatty()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_bar, leave=False):
        chunk = order[start:start + batch_size]
        ids = [prompts[i] for i in chunk]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=eos)
        for i, row in zip(chunk, out[:, width:].tolist()):
            answers[i] = row[: row.index(eos) + 1] if eos in row else row
    return answers


def generate_answers(model, tokenizer, examples: list[Example], max_new_tokens: int = 32, batch_size: int = 32,
                     progress: bool = True) -> list[str]:
    ids = generate_ids(model, tokenizer, [prompt_ids(ex, tokenizer) for ex in examples], max_new_tokens,
                       batch_size, progress)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def read_eval_data(tokenizer, data: str, max_seq_len: int, skip_invalid: bool, log=print):
    """The examples of a JSONL file to evaluate and their packed batches (loss on assistant tokens, long
    examples truncated as training would), with the [data] line saying what was read."""
    examples, _ = read_jsonl(data, "skip" if skip_invalid else "stop")
    docs, enc = encode_all(tokenizer, examples, max_seq_len, "truncate", "assistant", data)
    log(f"[data] {data}: {enc.summary(max_seq_len)}")
    return examples, pack(docs, max(max_seq_len, 4096))


def exact_match(predictions: list[str], references: list[str]) -> float:
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return hits / max(len(references), 1)


def evaluate(model: str, data: str, adapter: str | None = None, *, generate: bool = False,
             max_seq_len: int = DEFAULT_MAX_SEQ_LEN, max_new_tokens: int = 32, skip_invalid: bool = False,
             device: str = "auto", dtype: str = "auto", quantize: str = "none", log=print) -> dict:
    """Loss and perplexity of a local model directory (with a PEFT-format adapter, if given) on the target tokens
    of a JSONL file, as training counts them; with generate, also greedy answers and their exact match.
    Returns what `lorafuse eval --json` writes: model, adapter, data, loss, ppl, target_tokens[, exact_match].
    quantize "nf4": the base's projections in NF4, as QLoRA trained the adapter (quantize.py)."""
    from .lora import load_adapter, read_adapter_config
    from .model import check_supported, load_model, load_tokenizer, resolve_device, resolve_dtype

    check_supported(model)  # the model and the adapter are checked before the data
    if adapter:
        read_adapter_config(adapter)
    where = resolve_device(device)
    tokenizer = load_tokenizer(model)
    examples, batches = read_eval_data(tokenizer, data, max_seq_len, skip_invalid, log)
    hf_model = load_model(model, resolve_dtype(dtype, where), where, quantize=quantize)
    lora = load_adapter(hf_model, adapter) if adapter else None
    result = {"model": model, "adapter": adapter, "data": data}
    result.update(evaluate_loss(prepare_model(hf_model, stack_projections=False), batches))
    log(f"[eval] loss {result['loss']:.4f}  perplexity {result['ppl']:.3f}  over {result['target_tokens']} "
        f"target tokens" + (f"  (adapter r={lora.r})" if lora else ""))
    if generate:
        predictions = generate_answers(hf_model, tokenizer, examples, max_new_tokens)
        references = [prompt_and_answer(ex, tokenizer)[1] for ex in examples]
        result["exact_match"] = exact_match(predictions, references)
        log(f"[eval] exact match {result['exact_match']:.1%} of {len(examples)} examples")
    return result
