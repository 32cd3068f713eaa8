"""Data: JSONL validation with file:line:field errors, chat-template tokenization, trained tokens."""

import json

import numpy as np
import pytest

from lorafuse.engine.data import DataError, encode_all, encode_example, read_jsonl, split_examples

from engine_utils import write_jsonl

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello!"}]}


@pytest.mark.parametrize("line, expected", [
    ("{not json", "invalid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ('{"messages": [{"content": "x"}]}', "field 'messages[0].role': missing"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}',
     "field 'messages[1].content': empty assistant turn"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}', "must be a string"),
    ('{"messages": []}', "non-empty list"),
    ('{"prompt": "q"}', "field 'completion': missing"),
    ('{"prompt": "q", "completion": ""}', "field 'completion': empty"),
    ('{"text": "q"}', "found keys: text"),
])
def test_each_malformed_line_names_file_line_and_problem(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, line, CHAT])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert f"{path}:2:" in str(err.value)
    assert expected in str(err.value)
    assert "1 of 3 lines are invalid" in str(err.value)


def test_non_utf8_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, b'{"prompt": "\xff\xfe", "completion": "x"}'])
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8"):
        read_jsonl(path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(empty)
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_skip_mode_keeps_valid_lines_and_counts_bad_ones(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, "{bad", '{"messages": [{"role": "x", "content": "y"}]}',
                                              {"prompt": "a", "completion": "b"}, ""])
    examples, report = read_jsonl(path, on_error="skip")
    assert [e.line for e in examples] == [1, 4]
    assert len(report.errors) == 2 and report.blank == 1
    assert report.forms == {"chat": 1, "prompt_completion": 1}


def test_chat_labels_cover_exactly_the_assistant_turns(tiny_tokenizer):
    from lorafuse.engine.data import Example

    ex = Example(line=1, messages=[{"role": "user", "content": "first question"},
                                   {"role": "assistant", "content": "first answer"},
                                   {"role": "user", "content": "second question"},
                                   {"role": "assistant", "content": "second answer"}])
    doc = encode_example(tiny_tokenizer, ex)
    trained_text = tiny_tokenizer.decode(doc.input_ids[doc.trained])
    assert trained_text == "first answer<|end|>second answer<|end|>"  # not the newline after the marker
    untrained = tiny_tokenizer.decode(doc.input_ids[~doc.trained])
    assert "question" in untrained and "answer" not in untrained
    all_doc = encode_example(tiny_tokenizer, ex, train_on="all")
    assert all_doc.trained.all() and np.array_equal(all_doc.input_ids, doc.input_ids)


def test_prompt_completion_labels_only_the_completion_and_eos(tiny_tokenizer):
    from lorafuse.engine.data import Example

    doc = encode_example(tiny_tokenizer, Example(line=1, prompt="The refund", completion=" was sent"))
    assert tiny_tokenizer.decode(doc.input_ids[doc.trained]) == " was sent<|end|>"
    assert doc.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_overlong_examples_are_truncated_or_dropped_and_counted(tiny_tokenizer, tmp_path):
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    short = {"prompt": "q", "completion": "an answer"}
    examples, _ = read_jsonl(write_jsonl(tmp_path / "d.jsonl", [long, short, long]))
    docs, rep = encode_all(tiny_tokenizer, examples, max_seq_len=64, overlong="drop")
    assert len(docs) == 1 and rep.dropped_overlong == 2
    assert "2 over max_seq_len=64 (2 dropped)" in rep.summary(64)
    # Truncation cuts the assistant answer off: such examples teach nothing and are dropped, and said so.
    docs, rep = encode_all(tiny_tokenizer, examples, max_seq_len=64, overlong="truncate")
    assert rep.truncated == 2 and rep.dropped_no_target == 2 and len(docs) == 1
    assert "2 truncated to 64" in rep.summary(64) and "2 dropped with no trained token left" in rep.summary(64)


def test_split_is_seeded_and_disjoint(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)]
    examples, _ = read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    train, val, test = split_examples(examples, (0.1, 0.2), seed=3)
    assert (len(train), len(val), len(test)) == (35, 5, 10)
    assert {e.line for e in train} | {e.line for e in val} | {e.line for e in test} == set(range(1, 51))
    again = split_examples(examples, (0.1, 0.2), seed=3)
    assert [e.line for e in again[1]] == [e.line for e in val]


def test_a_utf8_byte_order_mark_is_accepted_and_reported(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\n" + json.dumps(CHAT).encode() + b"\n")
    examples, report = read_jsonl(path)
    assert len(examples) == 2 and report.bom and not report.errors
    assert not read_jsonl(write_jsonl(tmp_path / "plain.jsonl", [CHAT]))[1].bom
