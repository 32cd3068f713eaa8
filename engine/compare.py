"""The base model and several adapters on one held-out file, side by side (`lorafuse eval --adapter A
--adapter B`, `--report`, `--general`; `lorafuse.compare`).

The model is loaded once and every adapter once (adapters.py); each evaluation switches the active one.
Per system (the base model, then each adapter): loss and perplexity on the file's target tokens, and with
generation the greedy answers and their exact match; with general prompts the forgetting check of each
adapter against the base's answers (forgetting.py); with a report path, the side-by-side HTML page
(report_html.py) of every answer.
"""

from __future__ import annotations

from pathlib import Path

from .config import DEFAULT_MAX_SEQ_LEN
from .data import Example
from .report_html import Row, write_report


def shown_prompt(ex: Example) -> str:
    """What a rater reads as the prompt: the user's side of the conversation up to the answer (no system
    prompt: it is the same on every row), or the prompt text."""
    if ex.messages is None:
        return ex.prompt
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    turns = [m for m in ex.messages[:last] if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)


def compare(model: str, data: str, adapters: list[str] | dict[str, str], *, generate: bool = True,
            general: str | None = None, report: str | None = None, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
            max_new_tokens: int = 32, general_max_new_tokens: int = 48, general_max_change: float = 0.1,
            skip_invalid: bool = False, device: str = "auto", dtype: str = "auto", quantize: str = "none",
            log=print) -> dict:
    """Evaluate the base model and each adapter (a list is named by directory) on `data`. Returns
    {"model", "data", "systems": {"base": {...}, NAME: {...}}, "general": {NAME: ...}, "report": path}.
    quantize "nf4": the base's projections in NF4, as QLoRA trained the adapters."""
    from .adapters import adapter_names, load_adapters
    from .evaluate import evaluate_loss, exact_match, generate_answers, prompt_and_answer, read_eval_data
    from .forgetting import agreement, base_reference, read_general
    from .lora import read_adapter_config
    from .model import check_supported, load_model, load_tokenizer, resolve_device, resolve_dtype
    from .prepare import prepare_model

    if not isinstance(adapters, dict):
        adapters = dict(zip(adapter_names([str(a) for a in adapters]), (str(a) for a in adapters)))
    if "base" in adapters:
        raise ValueError("'base' names the model without an adapter; call the adapter something else")
    check_supported(model)  # model, adapters and prompts are checked before anything is loaded
    for path in adapters.values():
        read_adapter_config(path)
    prompts = read_general(general) if general else None
    generate = generate or report is not None
    where = resolve_device(device)
    tokenizer = load_tokenizer(model)
    examples, batches = read_eval_data(tokenizer, data, max_seq_len, skip_invalid, log)
    hf_model = load_model(model, resolve_dtype(dtype, where), where, quantize=quantize)
    loaded = load_adapters(hf_model, adapters)
    prepared = prepare_model(hf_model, stack_projections=False)
    references = [prompt_and_answer(ex, tokenizer)[1] for ex in examples]
    systems, answers, general_results, reference = {}, {}, {}, None
    for name in ["base", *adapters]:
        loaded.use(None if name == "base" else name)
        scores = {"adapter": adapters.get(name), **evaluate_loss(prepared, batches)}
        line = f"[eval] {name}: loss {scores['loss']:.4f}  perplexity {scores['ppl']:.3f}"
        if generate:
            answers[name] = generate_answers(hf_model, tokenizer, examples, max_new_tokens)
            scores["exact_match"] = exact_match(answers[name], references)
            line += f"  exact match {scores['exact_match']:.1%} of {len(examples)}"
        log(line)
        if prompts is not None:
            if name == "base":
                reference = base_reference(prepared, tokenizer, prompts, general_max_new_tokens)
            else:
                general_results[name] = agreement(prepared, tokenizer, prompts, reference,
                                                  max_change=general_max_change, max_new_tokens=general_max_new_tokens,
                                                  name=name, log=log)
        systems[name] = scores
    loaded.use(None)
    result = {"model": model, "data": data, "systems": systems}
    if answers:
        result["answers"] = answers
    if general_results:
        result["general"] = general_results
    if report is not None:
        rows = test_rows(examples, references, answers) + general_rows(general_results)
        write_report(report, rows, list(systems), title=f"{Path(model).name}: base vs {', '.join(adapters)}",
                     meta={"model": model, "data": data, "examples": len(examples)},
                     summary=summary_lines(systems, general_results))
        result["report"] = str(report)
        log(f"[eval] side-by-side report for rating: {report}")
    return result


def test_rows(examples: list[Example], references: list[str], answers: dict[str, list[str]]) -> list[Row]:
    """Report rows of a held-out file: prompt, reference and every system's answer."""
    return [Row(f"test:{ex.line}", "test", shown_prompt(ex), ref, {n: a[i] for n, a in answers.items()})
            for i, (ex, ref) in enumerate(zip(examples, references))]


def general_rows(general_results: dict) -> list[Row]:
    """Report rows of the forgetting check: each general prompt with the base's and every adapter's answer."""
    if not general_results:
        return []
    first = next(iter(general_results.values()))["answers"]
    return [Row(f"general:{a['line']}", "general", a["prompt"], None,
                {"base": a["base"], **{n: r["answers"][i]["finetuned"] for n, r in general_results.items()}})
            for i, a in enumerate(first)]


def summary_lines(systems: dict, general_results: dict) -> list[tuple[str, dict]]:
    """The report's summary table: loss, exact match and general agreement per system."""
    lines = [("answer loss", {n: f"{s['loss']:.3f}" for n, s in systems.items()})]
    if all("exact_match" in s for s in systems.values()):
        lines.append(("exact match", {n: f"{s['exact_match']:.1%}" for n, s in systems.items()}))
    if general_results:
        lines.append(("general answers unchanged", {"base": "(reference)", **{
            n: f"{r['unchanged']} of {r['prompts']}" for n, r in general_results.items()}}))
        lines.append(("base next token kept (general)", {"base": "(reference)", **{
            n: f"{r['token_agreement']:.1%}" for n, r in general_results.items()}}))
    return lines
