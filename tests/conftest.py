"""Test-suite setup.

TRITON_INTERPRET=1 is set here, before anything imports triton, so kernel calls on CPU tensors
run the real Triton kernels through Triton's interpreter (DESIGN.md). Engine tests that train
models use the `reference_kernels` fixture: the interpreter is far too slow for whole models,
and the kernels have their own tests.

Tests marked `gpu` need compiled kernels on a CUDA GPU: they run with TRITON_INTERPRET=0
(`make test-gpu`) and are skipped without a GPU or with the interpreter on. With the interpreter on,
the GPUs are hidden, so `make test` on a GPU machine is the same CPU suite as in CI (engine tests
use device: auto and CPU tolerances).
"""

import os

from lorafuse._interpreter import interpreter_requested  # imports nothing else: triton is not loaded yet

os.environ.setdefault("TRITON_INTERPRET", "1")
if interpreter_requested():
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for devices
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    interpreted = interpreter_requested()
    if torch.cuda.is_available() and not interpreted:
        return
    reason = "needs compiled kernels on a CUDA GPU: make test-gpu (TRITON_INTERPRET=0)" if interpreted else \
        "needs a CUDA GPU"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def reference_kernels(monkeypatch):
    """Run every kernel call through its PyTorch reference."""
    monkeypatch.setenv("LORAFUSE_KERNELS", "reference")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (GQA) with a BPE tokenizer and chat template, saved as a HF directory."""
    from lorafuse.engine.demo.base_model import build_model, build_tokenizer, tiny_config
    from lorafuse.engine.demo.tickets import pretraining_text

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tokenizer(pretraining_text(n_tickets=300), 400, path)
    config = tiny_config("llama", vocab_size=len(tokenizer), hidden=64, layers=2, heads=4, kv_heads=2,
                         intermediate=96, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    build_model(config, path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from lorafuse.engine.model import load_tokenizer

    return load_tokenizer(tiny_model_dir)



@pytest.fixture(scope="session")
def extension(tmp_path_factory):
    """The offload extension (csrc/), built once per session into a temporary cache, and loaded."""
    from lorafuse.engine import extension

    cache = tmp_path_factory.getbasetemp() / "lorafuse-cache"
    previous = os.environ.get("LORAFUSE_CACHE")
    os.environ["LORAFUSE_CACHE"] = str(cache)
    try:
        library = extension.build_extension()
        assert extension.load_extension(), extension.extension_status()
        yield library
    finally:
        if previous is None:
            os.environ.pop("LORAFUSE_CACHE", None)
        else:
            os.environ["LORAFUSE_CACHE"] = previous
