"""LayerCheckpointer (none / recompute / offload per decoder layer) and the memory-budget policy.

A stack of tiny Llama-like blocks (RMSNorm and SwiGLU as custom autograd Functions, LoRA on frozen
linears, RoPE, per-document causal attention) trains a few steps under every mode; in float32 on
the CPU, losses, gradients and updated weights must equal the plain run bit for bit, with the C++
arena and with its pure-PyTorch twin. GPU (marked): the same in bfloat16 against float64, and
the peak memory order none > recompute > offload.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lorafuse.engine.checkpointing import (
    LayerCheckpointer,
    estimate_peak_bytes,
    layer_modes,
    llama_layer_bytes_per_token,
    measure_bytes_per_token,
    plan_checkpointing,
)

BACKENDS = ["extension", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "extension":
        request.getfixturevalue("extension")
    return request.param


# ---------------------------------------------------------------------------------------------
# A tiny Llama-like decoder layer
# ---------------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """Saves its input and rstd with save_for_backward, and eps as a plain ctx attribute."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        return (x.float() * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x32, g32 = x.float(), grad.float()
        normed = x32 * rstd
        grad_weight = (g32 * normed).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gn = g32 * weight.float()
        grad_x = rstd * (gn - normed * (gn * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        return grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig


class LoRALinear(torch.nn.Module):
    def __init__(self, d_in, d_out, rank):
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out, bias=False)
        self.base.weight.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(rank, d_in) / d_in**0.5)
        self.lora_b = torch.nn.Parameter(torch.randn(d_out, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t() * 2.0


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TinyLlamaBlock(torch.nn.Module):
    def __init__(self, hidden=24, intermediate=40, heads=4, kv_heads=2, rank=3):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.input_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))  # trainable: a base-weight grad
        self.post_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden), requires_grad=False)
        self.q = LoRALinear(hidden, heads * self.head_dim, rank)
        self.k = LoRALinear(hidden, kv_heads * self.head_dim, rank)
        self.v = LoRALinear(hidden, kv_heads * self.head_dim, rank)
        self.o = LoRALinear(heads * self.head_dim, hidden, rank)
        self.gate = LoRALinear(hidden, intermediate, rank)
        self.up = LoRALinear(hidden, intermediate, rank)
        self.down = LoRALinear(intermediate, hidden, rank)

    def forward(self, hidden, cos, sin, doc_len: int):
        tokens = hidden.shape[0]
        x = RMSNormFunction.apply(hidden, self.input_norm, 1e-6)
        q = rope(self.q(x).view(tokens, self.heads, self.head_dim), cos, sin)
        k = rope(self.k(x).view(tokens, self.kv_heads, self.head_dim), cos, sin)
        v = self.v(x).view(tokens, self.kv_heads, self.head_dim)
        docs = tokens // doc_len  # documents of doc_len tokens back to back: a batch of causal attentions

        def per_doc(t):
            return t.view(docs, doc_len, t.shape[1], self.head_dim).transpose(1, 2)

        attn = F.scaled_dot_product_attention(per_doc(q), per_doc(k), per_doc(v), is_causal=True,
                                              enable_gqa=True)
        attn = attn.transpose(1, 2).reshape(tokens, self.heads * self.head_dim)
        hidden = hidden + self.o(attn)
        x = RMSNormFunction.apply(hidden, self.post_norm, 1e-6)
        return hidden + self.down(SwiGLUFunction.apply(self.gate(x), self.up(x)))


def rope_tables(tokens, doc_len, head_dim, dtype=torch.float32, device="cpu"):
    positions = torch.arange(tokens, device=device) % doc_len
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = positions[:, None].double() * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]  # [T, 1, D]: broadcast over heads
    return angles.cos().to(dtype), angles.sin().to(dtype)


def make_stack(n_layers=4, seed=1, **sizes):
    torch.manual_seed(seed)
    return torch.nn.ModuleList(TinyLlamaBlock(**sizes) for _ in range(n_layers))


def train(layers, modes, batches, *, backend="torch", steps=3, min_offload_bytes=0, lr=0.05):
    """SGD steps over `batches` (a list of micro-batches per step); returns losses, final trainable
    parameters, the gradient of each micro-batch's input, and the checkpointer."""
    ckpt = LayerCheckpointer("cpu", modes, backend=backend, min_offload_bytes=min_offload_bytes)
    params = [p for p in layers.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    losses, input_grads, stats = [], [], []
    for step in range(steps):
        for hidden, cos, sin, doc_len in batches[step % len(batches)]:
            hidden = hidden.clone().requires_grad_(step % 2 == 1)  # a frozen embedding's output on even steps
            out = hidden
            for index, layer in enumerate(layers):
                out = ckpt.checkpoint(index, layer, out, cos, sin, doc_len)
            loss = out.pow(2).mean()
            loss.backward()
            losses.append(loss.detach())
            input_grads.append(hidden.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ckpt.end_step()
        stats.append(ckpt.stats())
    return losses, [p.detach().clone() for p in params], input_grads, ckpt, stats


def batch(tokens=15, doc_len=5, hidden=24, head_dim=6):
    cos, sin = rope_tables(tokens, doc_len, head_dim)
    return torch.randn(tokens, hidden), cos, sin, doc_len


def assert_same_run(a, b):
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a[1], b[1], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a[2], b[2], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# Exactness in float32 on the CPU
# ---------------------------------------------------------------------------------------------


MODE_SETS = {
    "recompute": ["recompute"] * 4,
    "offload": ["offload"] * 3 + ["recompute"],
    "mixed": ["offload", "recompute", "none", "offload"],
}


@pytest.mark.parametrize("modes", list(MODE_SETS), ids=list(MODE_SETS))
def test_every_mode_trains_exactly_like_none(modes, backend):
    batches = [[batch()], [batch(tokens=12, doc_len=4)]]
    reference = train(make_stack(), ["none"] * 4, batches)
    run = train(make_stack(), MODE_SETS[modes], batches, backend=backend)
    assert_same_run(run, reference)
    n_offloaded = MODE_SETS[modes].count("offload")
    stats = run[4]
    assert stats[-1]["backend"] == (None if n_offloaded == 0 else backend)
    if n_offloaded:
        assert stats[-1]["offloads"] == 3 * n_offloaded  # only the layer inputs, not cos/sin
        assert stats[-1]["fetches"] == 3 * n_offloaded


def test_prefetch_runs_one_layer_ahead_in_backward(backend):
    """Every offloaded input was prefetched before its layer's backward asked for it."""
    layers = make_stack(n_layers=5)
    ckpt = LayerCheckpointer("cpu", ["offload"] * 4 + ["none"], backend=backend, min_offload_bytes=0)
    hidden, cos, sin, doc_len = batch()
    out = hidden
    for index, layer in enumerate(layers):
        out = ckpt.checkpoint(index, layer, out, cos, sin, doc_len)
    assert ckpt.stats()["entries"] == 4 and ckpt.stats()["staged"] == 0
    out.pow(2).mean().backward()
    stats = ckpt.stats()
    assert stats["prefetch_hits"] == 4 and stats["prefetch_misses"] == 0 and stats["staged"] == 0


def test_arena_is_reused_across_steps_and_micro_batches(backend):
    """After the first step the arena holds exactly one step's bytes and never grows again; with
    two micro-batches per step it is recycled after each backward, so it does not double."""
    tokens, hidden_size = 15, 24
    step_bytes = 0
    for _ in range(3):  # three offloaded layer inputs of [15, 24] float32, starts aligned to 256
        step_bytes = -(-step_bytes // 256) * 256 + tokens * hidden_size * 4
    modes = ["offload"] * 3 + ["recompute"]
    one = train(make_stack(), modes, [[batch()]], backend=backend, steps=4)[4]
    two = train(make_stack(), modes, [[batch(), batch()]], backend=backend, steps=4)[4]
    for stats in (one, two):
        assert all(s["capacity_bytes"] == step_bytes for s in stats)
        assert all(s["host_allocations"] == stats[0]["host_allocations"] for s in stats)
    assert two[-1]["offloads"] == 2 * one[-1]["offloads"]


def test_tiny_inputs_stay_on_the_device():
    layers = make_stack()
    ckpt = LayerCheckpointer("cpu", ["offload"] * 4, backend="torch")  # default min_offload_bytes: 1 MiB
    hidden, cos, sin, doc_len = batch()
    out = hidden
    for index, layer in enumerate(layers):
        out = ckpt.checkpoint(index, layer, out, cos, sin, doc_len)
    out.sum().backward()
    assert ckpt.stats()["offloads"] == 0


def test_no_grad_is_a_plain_call_and_errors_are_clear():
    layers = make_stack(n_layers=2)
    ckpt = LayerCheckpointer("cpu", ["offload", "offload"], backend="torch", min_offload_bytes=0)
    hidden, cos, sin, doc_len = batch()
    with torch.no_grad():
        first = ckpt.checkpoint(0, layers[0], hidden, cos, sin, doc_len)
        out = ckpt.checkpoint(1, layers[1], first, cos, sin, doc_len)
    assert not out.requires_grad and ckpt.stats()["offloads"] == 0
    with pytest.raises(ValueError, match="must be one of"):
        ckpt.set_modes(["offload", "keep"])
    with pytest.raises(IndexError, match="layer 2 has no checkpointing mode"):
        ckpt.checkpoint(2, layers[0], hidden, cos, sin, doc_len)
    out = ckpt.checkpoint(0, layers[0], hidden.requires_grad_(), cos, sin, doc_len)
    ckpt.end_step()  # drops the offloaded input: this graph cannot run backward any more
    with pytest.raises(RuntimeError, match="used after reset"):
        out.sum().backward()


def test_falls_back_to_pytorch_with_one_log_line(tmp_path):
    """When the extension cannot build, offload still works on the PyTorch twin and says so once."""
    sources = tmp_path / "broken"
    (sources / "csrc").mkdir(parents=True)
    (sources / "csrc" / "offload_arena.cpp").write_text("#error broken on purpose\n")
    (sources / "CMakeLists.txt").write_text('cmake_minimum_required(VERSION 3.19)\n'
                                            'message(FATAL_ERROR "broken on purpose")\n')
    script = (
        "import torch\n"
        "from lorafuse.engine.checkpointing import LayerCheckpointer\n"
        "a = LayerCheckpointer('cpu', ['offload', 'none'], min_offload_bytes=0)\n"
        "b = LayerCheckpointer('cpu', ['offload', 'none'], min_offload_bytes=0)\n"
        "x = torch.randn(5, 3, requires_grad=True)\n"
        "y = a.checkpoint(1, torch.sin, a.checkpoint(0, torch.cos, x))\n"
        "y.sum().backward()\n"
        "assert torch.equal(x.grad, -torch.cos(torch.cos(x)) * torch.sin(x))\n"
        "print(a.backend, b.backend, a.stats()['offloads'])\n"
    )
    env = {**os.environ, "LORAFUSE_SOURCE_DIR": str(sources), "LORAFUSE_CACHE": str(tmp_path / "cache"),
           "PYTHONSAFEPATH": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch", "torch", "1"]
    lines = [line for line in result.stderr.splitlines() if "lorafuse" in line]
    assert len(lines) == 1, result.stderr
    assert "extension unavailable (cmake failed" in lines[0] and "pure-PyTorch" in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# Memory-budget policy
# ---------------------------------------------------------------------------------------------


def test_layer_modes_from_the_config_value():
    assert layer_modes("none", 3) == ["none"] * 3
    assert layer_modes("recompute", 2) == ["recompute"] * 2
    assert layer_modes("offload", 4) == ["offload"] * 3 + ["recompute"]
    assert layer_modes("offload", 1) == ["recompute"] and layer_modes("offload", 0) == []
    with pytest.raises(ValueError, match="must be one of"):
        layer_modes("keep", 2)


def test_peak_model_by_hand():
    # kept 10 bytes/token, input 1 byte/token, 1 token
    assert estimate_peak_bytes(["none"] * 4, 10, 1, 1) == 40
    assert estimate_peak_bytes(["recompute"] * 4, 10, 1, 1) == 3 + 11
    assert estimate_peak_bytes(["offload", "offload", "recompute", "none"], 10, 1, 1) == 12
    assert estimate_peak_bytes(["offload"] * 3 + ["recompute"], 10, 1, 1) == 12  # K + 2I
    assert estimate_peak_bytes(["recompute", "none", "none", "none"], 10, 1, 2) == 62


@pytest.mark.parametrize(("budget", "expected"), [
    (1e9, ["none"] * 4),
    (40, ["none"] * 4),
    (39, ["recompute", "none", "none", "none"]),
    (30, ["recompute", "recompute", "none", "none"]),
    (21, ["offload", "offload", "none", "none"]),
    (12, ["offload", "offload", "recompute", "none"]),
])
def test_plan_keeps_then_recomputes_then_offloads(budget, expected):
    modes = plan_checkpointing(4, 10, 1, 1, budget, min_offload_bytes=0)
    assert modes == expected
    assert estimate_peak_bytes(modes, 10, 1, 1) <= budget


def test_plan_when_nothing_fits(caplog):
    with caplog.at_level(logging.WARNING):
        modes = plan_checkpointing(4, 10, 1, 1, 5, min_offload_bytes=0)
    assert modes[-1] != "offload" and estimate_peak_bytes(modes, 10, 1, 1) == 12  # the smallest peak
    assert "more than the budget" in caplog.text
    # Inputs under min_offload_bytes are never offloaded. Keeping the top layer costs less than
    # recomputing it (its input need not be held beside its activations).
    modes = plan_checkpointing(4, 10, 1, 1, 5, min_offload_bytes=2)
    assert modes == ["recompute"] * 3 + ["none"] and estimate_peak_bytes(modes, 10, 1, 1) == 13
    assert plan_checkpointing(0, 10, 1, 1, 5) == []


def test_plan_for_llama_8b_at_32k_tokens():
    kept = llama_layer_bytes_per_token(4096, 14336, 32, 8, dtype=torch.bfloat16, lora_rank=16)
    assert kept == 2 * (4 * 4096 + 2 * 4096 + 2 * 1024 + 3 * 14336 + 7 * 16) + 4 * (2 + 32)
    layer_input = 4096 * 2
    tokens = 32768
    gib = 2**30
    for budget_gib in (200, 60, 20, 8, 5):
        modes = plan_checkpointing(32, kept, layer_input, tokens, budget_gib * gib)
        assert len(modes) == 32 and modes[-1] != "offload"
        assert estimate_peak_bytes(modes, kept, layer_input, tokens) <= budget_gib * gib
        order = {"offload": 0, "recompute": 1, "none": 2}
        assert [order[m] for m in modes] == sorted(order[m] for m in modes)  # offload | recompute | keep
    assert plan_checkpointing(32, kept, layer_input, tokens, 200 * gib) == ["none"] * 32
    tight = plan_checkpointing(32, kept, layer_input, tokens, 5 * gib)
    assert tight.count("offload") >= 20  # recompute alone needs 32 inputs (8 GiB) + a layer


def test_measured_bytes_per_token():
    hidden_size = 10
    weight = torch.randn(hidden_size, hidden_size, requires_grad=True)

    def fn(h, w):
        return (h @ w).sin()  # saves h and w (matmul), and h @ w (sin): 2 activations per token

    per_token = measure_bytes_per_token(fn, lambda n: (torch.randn(n, hidden_size), weight), tokens=(16, 48))
    assert per_token == 2 * hidden_size * 4
    block = TinyLlamaBlock()

    def make_inputs(n):
        cos, sin = rope_tables(n, n, 6)
        return torch.randn(n, 24), cos, sin, n

    assert measure_bytes_per_token(block, make_inputs, tokens=(8, 16)) > 0


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gpu_bf16_offload_and_recompute_match_and_save_memory(backend_name, request):
    if backend_name == "extension":
        request.getfixturevalue("extension")
        if not torch.ops.lorafuse.has_cuda():
            pytest.fail("the extension was built without CUDA on a machine with a GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    sizes = dict(hidden=1024, intermediate=2816, heads=8, kv_heads=2, rank=16)
    n_layers, tokens, doc_len = 8, 8192, 1024
    layers64 = make_stack(n_layers=n_layers, **sizes).to(device=device, dtype=torch.float64)
    layers = make_stack(n_layers=n_layers, **sizes).to(device=device, dtype=torch.bfloat16)
    hidden = torch.randn(tokens, sizes["hidden"], device=device)
    cos, sin = rope_tables(tokens, doc_len, sizes["hidden"] // sizes["heads"], device=device)

    def run(layer_stack, modes, dtype):
        ckpt = LayerCheckpointer(device, modes, backend=backend_name)
        params = [p for p in layer_stack.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        x = hidden.to(dtype).requires_grad_()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = x
        for index, layer in enumerate(layer_stack):
            out = ckpt.checkpoint(index, layer, out, cos.to(dtype), sin.to(dtype), doc_len)
        loss = out.float().pow(2).mean()
        loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        stats = ckpt.stats()
        ckpt.end_step()
        return [out.detach(), x.grad] + [p.grad for p in params], peak, stats

    reference, _, _ = run(layers64, ["none"] * n_layers, torch.float64)
    results = {}
    for name, modes in (("none", ["none"] * n_layers), ("recompute", ["recompute"] * n_layers),
                        ("offload", ["offload"] * (n_layers - 1) + ["recompute"])):
        results[name] = run(layers, modes, torch.bfloat16)
    for name, (tensors, _, _) in results.items():
        for got, plain, ref in zip(tensors, results["none"][0], reference, strict=True):
            err = rel_err(got, ref)
            assert err < 2e-2, (name, err)
            assert err <= rel_err(plain, ref) + 2e-3, (name, err)
    stats = results["offload"][2]
    assert stats["offloads"] == n_layers - 1 and stats["prefetch_hits"] == n_layers - 1
    assert stats["prefetch_misses"] == 0 and stats["pinned"] == 1
    layer_input = tokens * sizes["hidden"] * 2
    peak = {name: result[1] for name, result in results.items()}
    assert peak["recompute"] < peak["none"]
    # The model says recompute holds 6 more layer inputs than offload at its peak; ask for half of that.
    assert peak["offload"] < peak["recompute"] - 3 * layer_input, peak
