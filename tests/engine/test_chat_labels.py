"""Assistant-only labels in the chat formats of every family we train: token for token what HF's
return_assistant_tokens_mask gives for the same template with {% generation %} markers, including
conversations that open with an assistant turn, one-letter answers, and Qwen3's reasoning turns."""

import copy

import numpy as np
import pytest

from lorafuse.engine.data import DataError, Example, assistant_char_spans, encode_example

import chat_templates

CONVERSATIONS = {
    "system and two turns": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"},
                             {"role": "assistant", "content": "Still here."}],
    "assistant first": [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "Refund"},
                        {"role": "assistant", "content": "Sure."}],
    "one-letter answers": [{"role": "user", "content": "Pick A or B"}, {"role": "assistant", "content": "A"},
                           {"role": "user", "content": "I said B?"}, {"role": "assistant", "content": "I"}],
    "answer with spaces": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  padded answer  "}],
}


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": chat_templates.SPECIAL})
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", chat_templates.NAMES)
def test_labels_equal_hf_assistant_mask(tiny_tokenizer, family, conversation):
    messages = CONVERSATIONS[conversation]
    if family == "mistral" and messages[0]["role"] == "assistant":
        pytest.skip("Mistral's format has no turn before the first [INST]")
    plain = with_template(tiny_tokenizer, chat_templates.plain(family))
    marked = with_template(tiny_tokenizer, chat_templates.marked(family))
    render = lambda tok: tok.apply_chat_template(messages, tokenize=False)  # noqa: E731
    assert render(plain) == render(marked)  # the markers change nothing but the mask
    hf = marked.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ours = encode_example(plain, Example(line=1, messages=messages))
    assert ours.input_ids.tolist() == list(hf["input_ids"])
    assert ours.trained.tolist() == [bool(x) for x in hf["assistant_masks"]], (
        plain.decode(ours.input_ids[ours.trained]), marked.decode(np.asarray(hf["input_ids"])[
            np.asarray(hf["assistant_masks"], dtype=bool)]))
    via_markers = encode_example(marked, Example(line=1, messages=messages))  # HF's mask used directly
    assert np.array_equal(via_markers.trained, ours.trained)


def test_qwen3_multi_turn_with_reasoning_trains_what_the_template_keeps(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, chat_templates.plain("qwen3"))
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"}]
    full, spans = assistant_char_spans(tok, messages)
    assert "add them" not in full  # the first turn's reasoning is dropped by the template
    assert [full[a:b] for a, b in spans] == ["4<|im_end|>", "<think>\nagain\n</think>\n\n6<|im_end|>"]
    marked = with_template(tiny_tokenizer, chat_templates.marked("qwen3"))
    hf = marked.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert encode_example(tok, Example(line=1, messages=messages)).trained.tolist() == [
        bool(x) for x in hf["assistant_masks"]]


def test_an_answer_the_template_does_not_render_is_refused_by_turn(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n"
                                        "{% endfor %}")
    with pytest.raises(DataError, match=r"assistant turn 1 \(messages\[1\]\) verbatim"):
        encode_example(tok, Example(line=7, messages=[{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "lower case"}]))
