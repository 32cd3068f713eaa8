"""Chat templates in the formats of the families we train, written here for the label tests.

Each renders a conversation the way its family does (role headers, end-of-turn markers, where the
system prompt goes, Qwen3 dropping the reasoning of earlier assistant turns). `marked(name)` is the
same template with HF's {% generation %} markers around each assistant turn's text and end-of-turn
marker: it renders the same text, and HF's return_assistant_tokens_mask then says which tokens are
assistant tokens, the reference our labels are compared with.
"""

from __future__ import annotations

# {A} opens and {Z} closes an assistant turn's trained text; plain templates drop them.
_TEMPLATES = {
    "chatml": (  # Qwen2: a default system prompt when the conversation has none
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{A}{{ m['content'] }}<|im_end|>{Z}{% else %}{{ m['content'] }}<|im_end|>"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "qwen3": (  # earlier assistant turns lose their reasoning; the last one keeps it
        "{% set ns = namespace(last_user=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
        "{% set content = m['content'] %}{% set reasoning = '' %}{% if '</think>' in content %}"
        "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
        "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
        "{% if loop.index0 > ns.last_user and reasoning %}{A}<think>\n{{ reasoning }}\n</think>\n\n{{ content }}"
        "<|im_end|>{Z}{% else %}{A}{{ content }}<|im_end|>{Z}{% endif %}"
        "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{% if m['role'] == 'assistant' %}{A}{{ m['content'] | trim }}<|eot_id|>{Z}{% else %}"
        "{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "mistral": (  # the system prompt goes into the first user turn; no assistant header at all
        "{{ bos_token }}{% set system = '' %}{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\n\n' %}{% endif %}{% for m in messages %}"
        "{% if m['role'] == 'user' %}[INST] {% if loop.index0 <= 1 %}{{ system }}{% endif %}{{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %} {A}{{ m['content'] }}</s>{Z}{% endif %}{% endfor %}"),
    "gemma": (  # "model" for the assistant; the system prompt joins the first user turn
        "{{ bos_token }}{% set system = '' %}{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\n\n' %}{% endif %}{% for m in messages %}"
        "{% if m['role'] == 'user' %}<start_of_turn>user\n{% if loop.index0 <= 1 %}{{ system }}{% endif %}"
        "{{ m['content'] | trim }}<end_of_turn>\n{% elif m['role'] == 'assistant' %}<start_of_turn>model\n"
        "{A}{{ m['content'] | trim }}<end_of_turn>{Z}{{ '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{A}{{ m['content'] }}<|end|>{Z}"
        "{% else %}{{ m['content'] }}<|end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
        "{% endif %}{{ eos_token if not add_generation_prompt else '' }}"),
}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]",
           "[/INST]", "</s>", "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>",
           "<|end|>", "<think>", "</think>"]
NAMES = sorted(_TEMPLATES)


def plain(name: str) -> str:
    return _TEMPLATES[name].replace("{A}", "").replace("{Z}", "")


def marked(name: str) -> str:
    return _TEMPLATES[name].replace("{A}", "{% generation %}").replace("{Z}", "{% endgeneration %}")
