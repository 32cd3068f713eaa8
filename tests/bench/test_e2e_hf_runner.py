"""The HF + PEFT systems of the end-to-end benchmark (bench/harness/e2e_hf_runner.py): how they batch."""

import torch

import lorafuse

from e2e_data import single_document
from e2e_hf_runner import HFRunner
from e2e_runner import Settings


def test_stock_padding_is_counted_apart_from_useful_tokens(cpu_bench):
    settings = Settings(model="tiny", device=torch.device("cpu"), dtype=torch.float32, stock_batch_size=2)
    runner = HFRunner(settings, "stock")
    docs = [single_document(n, 256, seed=0) for n in (5, 3, 8)]
    prep = runner.prepare(docs)
    assert prep.useful_tokens == 16
    assert prep.processed_tokens == 2 * 5 + 1 * 8  # each micro-batch padded to its longest document
    assert prep.targets == 4 + 2 + 7
    first = prep.micro[0]
    assert first["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert first["labels"][1, 3:].tolist() == [-100, -100]  # no loss on padding
    packed = HFRunner(settings, "hf_packed").prepare(docs)
    assert packed.processed_tokens == packed.useful_tokens == 16
    runner.set_case("hf_patched")  # the same padded batches; the patched forward skips the padding
    patched = runner.prepare(docs)
    assert patched.processed_tokens == patched.useful_tokens == 16
    assert patched.micro[0]["attention_mask"].tolist() == first["attention_mask"].tolist()
    assert lorafuse.is_patched(runner.model)
    runner.set_case("stock")
    assert not lorafuse.is_patched(runner.model)
    assert packed.micro[0]["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert packed.micro[0]["labels"][0, 5].item() == -100  # the second document's start is no target
