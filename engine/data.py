"""Training data: read and validate JSONL, tokenize with the chat template, mark trained tokens.

Two line forms are accepted:
  chat:               {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  prompt/completion:  {"prompt": "...", "completion": "..."}

Every problem is reported as FILE:LINE: field: what is wrong. A file with any bad line is
refused before training starts unless the user asks to skip bad lines (they are then counted).

A tokenized example is a `Document`: token ids and a per-token flag saying whether the model is
trained to predict that token. Packing (packing.py) turns flags into aligned labels.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROLES = ("system", "user", "assistant")
BOM = b"\xef\xbb\xbf"
MAX_ERRORS_SHOWN = 20


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""


@dataclass
class Example:
    line: int  # 1-based line number in its file
    messages: list[dict] | None = None  # chat form
    prompt: str | None = None  # prompt/completion form
    completion: str | None = None


@dataclass
class Document:
    input_ids: np.ndarray  # int64 [L]
    trained: np.ndarray  # bool [L]: the model learns to predict this token
    line: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class ReadReport:
    path: str
    lines: int = 0
    blank: int = 0
    examples: int = 0
    forms: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # "FILE:LINE: field: problem"
    bom: bool = False  # the file starts with a UTF-8 byte order mark (accepted)


def _check_line(obj, where: str) -> tuple[Example | None, str | None]:
    """Validate one parsed JSON value. Returns (example, None) or (None, error message)."""
    if not isinstance(obj, dict):
        return None, f"{where}: the line must be a JSON object, got {type(obj).__name__}"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, f"{where}: field 'messages': must be a non-empty list of messages"
        has_assistant = False
        for i, m in enumerate(msgs):
            f = f"messages[{i}]"
            if not isinstance(m, dict):
                return None, f"{where}: field '{f}': must be an object with 'role' and 'content'"
            if "role" not in m:
                return None, f"{where}: field '{f}.role': missing"
            role = m["role"]
            if role not in ROLES:
                return None, f"{where}: field '{f}.role': unknown role {role!r} (expected one of {', '.join(ROLES)})"
            if "content" not in m:
                return None, f"{where}: field '{f}.content': missing"
            if not isinstance(m["content"], str):
                return None, f"{where}: field '{f}.content': must be a string, got {type(m['content']).__name__}"
            if role == "assistant":
                if not m["content"].strip():
                    return None, f"{where}: field '{f}.content': empty assistant turn"
                has_assistant = True
        if not has_assistant:
            return None, f"{where}: field 'messages': no assistant turn, so nothing to learn"
        return Example(line=0, messages=[{"role": m["role"], "content": m["content"]} for m in msgs]), None
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                return None, f"{where}: field '{key}': missing (prompt/completion form needs both)"
            if not isinstance(obj[key], str):
                return None, f"{where}: field '{key}': must be a string, got {type(obj[key]).__name__}"
        if not obj["completion"].strip():
            return None, f"{where}: field 'completion': empty"
        return Example(line=0, prompt=obj["prompt"], completion=obj["completion"]), None
    keys = ", ".join(sorted(obj)) or "none"
    return None, f"{where}: expected field 'messages' (chat) or 'prompt' and 'completion'; found keys: {keys}"


def read_jsonl(path: str | Path, on_error: str = "stop") -> tuple[list[Example], ReadReport]:
    """Read and validate every line. on_error='stop' raises DataError listing the problems;
    'skip' keeps the good lines and records the bad ones in the report."""
    path = Path(path)
    report = ReadReport(path=str(path))
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples: list[Example] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            report.lines += 1
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(BOM):  # written by some editors; not part of the first line
                raw, report.bom = raw[len(BOM):], True
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.errors.append(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
                continue
            if not text.strip():
                report.blank += 1
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                report.errors.append(f"{where}: invalid JSON at column {e.colno}: {e.msg}")
                continue
            ex, err = _check_line(obj, where)
            if err:
                report.errors.append(err)
                continue
            ex.line = lineno
            report.forms["chat" if ex.messages is not None else "prompt_completion"] += 1
            examples.append(ex)
    report.examples = len(examples)
    if not examples and not report.errors:
        raise DataError(f"{path}: no examples (the file is empty or has only blank lines)")
    if report.errors and on_error == "stop":
        shown = "\n  ".join(report.errors[:MAX_ERRORS_SHOWN])
        more = len(report.errors) - MAX_ERRORS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DataError(
            f"{path}: {len(report.errors)} of {report.lines} lines are invalid; nothing was trained.\n  {shown}{tail}\n"
            "Fix them, or set data.on_error=skip to train on the valid lines only.")
    if not examples:
        raise DataError(f"{path}: no valid examples ({len(report.errors)} invalid lines)")
    return examples, report


def split_examples(examples: list[Example], fractions: tuple[float, ...], seed: int) -> list[list[Example]]:
    """Seeded shuffle, then cut off the given fractions; returns [rest, part1, part2, ...]."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for frac in fractions:
        n = int(round(frac * len(examples)))
        parts.append([examples[i] for i in sorted(order[start:start + n])])
        start += n
    rest = [examples[i] for i in sorted(order[start:])]
    if not rest:
        raise DataError("the split leaves no training examples; lower data.validation_fraction / test_fraction")
    return [rest, *parts]


# ----------------------------------------------------------------------------------------------
# Tokenization


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")
_SENTINEL = "\u2063lorafuse\u2063"  # text no template alters: finds what follows an assistant turn's content


def has_generation_markers(tokenizer) -> bool:
    """The template marks assistant text itself ({% generation %}): HF's assistant mask is then exact."""
    return bool(GENERATION_MARKER.search(getattr(tokenizer, "chat_template", None) or ""))


def end_of_turn_text(tokenizer) -> str:
    """What the template writes right after an assistant turn's content to end it (<|im_end|>, <|eot_id|>,
    </s>, <end_of_turn>, ...): the special token it starts with, else what follows the content both when
    another turn comes and when the conversation ends, up to the end of that line. Whitespace after it
    belongs to no turn (the newline after ChatML's <|im_end|>, as HF's assistant mask has it)."""
    def after(messages):
        rendered = _render(tokenizer, messages, add_generation_prompt=False)
        return rendered.split(_SENTINEL, 1)[1] if _SENTINEL in rendered else ""

    turn = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
    last, followed = after(turn), after(turn + [{"role": "user", "content": "?"}])
    head = followed.lstrip(" ")
    specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                      key=len, reverse=True)
    for special in specials:
        if special and head.startswith(special):
            return special
    return os.path.commonprefix([last, followed]).strip().split("\n", 1)[0].strip()


def assistant_char_spans(tokenizer, messages: list[dict], end_of_turn: str | None = None,
                         ) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and find the characters of each assistant turn: its content and the
    template's end-of-turn text, so the model also learns to stop; not the role header before it nor
    the whitespace after. Turns are found by their content, in order, in the full rendering (an answer
    with the end-of-turn text right after it, so a short answer is not taken for part of a header), so a
    template that rewrites earlier turns (Qwen3 drops their reasoning) works as long as each answer
    appears verbatim; one that does not is refused."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    eot = end_of_turn_text(tokenizer) if end_of_turn is None else end_of_turn
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        found = _find_turn(full, m["content"], cursor, eot if m["role"] == "assistant" else "")
        if found is None:
            if m["role"] == "assistant":
                raise DataError(f"the chat template does not render assistant turn {i} (messages[{i}]) verbatim, "
                                "so its tokens cannot be located; use data.train_on=all or the prompt/completion form")
            continue  # a system prompt a template moves or merges: no anchor, nothing to train
        if m["role"] == "assistant":
            spans.append(found)
        cursor = found[1]
    return full, spans


def _find_turn(text: str, content: str, cursor: int, eot: str) -> tuple[int, int] | None:
    """(start, end) at or after cursor of content followed by the end-of-turn text eot (end includes it),
    trying the content verbatim, stripped (templates that trim), and its answer after a reasoning block
    (templates that drop earlier turns' reasoning); without eot after it, the content alone."""
    candidates = [content, content.strip()]
    if "</think>" in content:
        candidates.append(content.split("</think>", 1)[1].strip())
    for with_eot in ([True, False] if eot else [False]):
        for candidate in filter(None, candidates):
            pattern = re.escape(candidate) + (" *" + re.escape(eot) if with_eot else "")
            if found := re.compile(pattern).search(text, cursor):
                return found.start(), found.end()
    return None


def _hf_assistant_mask(tokenizer, messages) -> tuple[list[int], list[bool]]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]


def encode_example(tokenizer, ex: Example, train_on: str = "assistant") -> Document:
    """Token ids and trained-token flags for one example."""
    if ex.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; chat-form data needs one "
                            "(add chat_template to tokenizer_config.json, or use prompt/completion form)")
        if has_generation_markers(tokenizer):
            ids, trained = _hf_assistant_mask(tokenizer, ex.messages)
        else:
            text, spans = assistant_char_spans(tokenizer, ex.messages)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            # a token is the turn's when it overlaps it (" A" of an answer "A"), as HF's assistant mask counts
            trained = [any(start < e and end > s for s, e in spans) for start, end in enc["offset_mapping"]]
        if train_on == "all":
            trained = [True] * len(ids)
    else:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"] if ex.prompt else []
        if tokenizer.bos_token_id is not None and not prompt_ids:
            prompt_ids = [tokenizer.bos_token_id]
        completion_ids = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        ids = prompt_ids + completion_ids
        trained = [train_on == "all"] * len(prompt_ids) + [True] * len(completion_ids)
    return Document(np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool), line=ex.line)


@dataclass
class EncodeReport:
    documents: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0  # nothing left to learn (e.g. truncation removed the whole answer)
    lengths: list[int] = field(default_factory=list)  # token lengths before truncation
    target_tokens: int = 0

    def summary(self, max_seq_len: int) -> str:
        if not self.lengths:
            return "no examples"
        a = np.asarray(self.lengths)
        over = int((a > max_seq_len).sum())
        parts = [f"{self.documents} documents, {int(a.sum())} tokens before truncation",
                 f"length min {a.min()} / median {int(np.median(a))} / p95 {int(np.percentile(a, 95))} / max {a.max()}",
                 f"{self.target_tokens} trained tokens"]
        if over:
            what = []
            if self.truncated:
                what.append(f"{self.truncated} truncated to {max_seq_len}")
            if self.dropped_overlong:
                what.append(f"{self.dropped_overlong} dropped")
            parts.append(f"{over} over max_seq_len={max_seq_len} ({', '.join(what)})")
        if self.dropped_no_target:
            parts.append(f"{self.dropped_no_target} dropped with no trained token left")
        return "; ".join(parts)


def encode_all(tokenizer, examples: list[Example], max_seq_len: int, overlong: str = "truncate",
               train_on: str = "assistant", path: str = "") -> tuple[list[Document], EncodeReport]:
    rep = EncodeReport()
    docs = []
    for ex in examples:
        try:
            doc = encode_example(tokenizer, ex, train_on)
        except DataError as e:
            raise DataError(f"{path}:{ex.line}: {e}") from None
        rep.lengths.append(len(doc))
        if len(doc) > max_seq_len:
            if overlong == "drop":
                rep.dropped_overlong += 1
                continue
            rep.truncated += 1
            doc = Document(doc.input_ids[:max_seq_len], doc.trained[:max_seq_len], doc.line)
        # Position 0 is never a target (nothing precedes it); a document must teach something.
        if not doc.trained[1:].any():
            rep.dropped_no_target += 1
            continue
        rep.target_tokens += int(doc.trained[1:].sum())
        docs.append(doc)
    rep.documents = len(docs)
    return docs, rep
