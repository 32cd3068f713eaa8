"""The cuBLAS LoRA GEMM path (engine/lora_gemm.py, kernels/lora_cublas.py) in the engine: a micro model's
training step equals the reference step; the [W | B] buffers hold the masters' B after every optimizer step;
the path is chosen as train.lora_gemm / LORAFUSE_LORA_GEMM say, and refused where it cannot run."""

import dataclasses

import numpy as np
import pytest
import torch

from lorafuse.engine.config import ConfigError, LoraConfig, load_config
from lorafuse.engine.data import Document
from lorafuse.engine.demo.base_model import build_model, tiny_config
from lorafuse.engine.forward import packed_loss
from lorafuse.engine.lora import inject_lora, lora_modules, lora_parameters
from lorafuse.engine.lora_gemm import resolve
from lorafuse.engine.model import load_model
from lorafuse.engine.ops import REFERENCE
from lorafuse.engine.packing import make_batch
from lorafuse.engine.prepare import DecoderSpec, prepare_model
from lorafuse.engine.step import train_step
from lorafuse.engine.train import train
from lorafuse.kernels._launch import launches

from engine_utils import QUIET, reference_then_kernels, tiny_train_config, write_ticket_files

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def micro(tmp_path, model_type, lora_gemm="cublas", targets=ALL, dropout=0.0, seed=2, **extra):
    layers = extra.pop("layers", 1)
    build_model(tiny_config(model_type, vocab_size=97, hidden=32, layers=layers, heads=2, kv_heads=1, intermediate=48,
                            head_dim=16, **extra), tmp_path, seed=seed)
    model = load_model(tmp_path, torch.float32, torch.device("cpu"))
    prepared = prepare_model(model, lora_gemm=lora_gemm)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets, dropout=dropout))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    return model, prepared


def batch(seed=0, lengths=(11, 1, 6)):
    rng = np.random.default_rng(seed)
    return make_batch([Document(rng.integers(3, 97, n), rng.random(n) < 0.8) for n in lengths])


def reference_of(prepared):
    return dataclasses.replace(prepared, ops=REFERENCE, lora_gemm=None)


@pytest.mark.parametrize(("model_type", "targets", "extra"), [
    ("qwen3", ALL, {}),  # q/k norms
    ("qwen2", ALL, {}),  # q/k/v biases
    ("llama", ["q_proj", "v_proj", "down_proj"], {"layers": 2}),  # k, o, gate, up without adapter
    ("gemma2", ALL, {"sliding_window": 4, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                     "query_pre_attn_scalar": 12}),  # GeGLU, (1 + w) and sandwich norms
])
def test_micro_model_step_on_the_cublas_path_matches_the_reference(tmp_path, monkeypatch, model_type, targets,
                                                                  extra):
    model, prepared = micro(tmp_path, model_type, targets=targets, **extra)
    b = batch()
    params = lora_parameters(model)

    ref_loss, ref_grads, loss, grads, ran = reference_then_kernels(
        monkeypatch, lambda: packed_loss(reference_of(prepared), b), lambda: packed_loss(prepared, b), params)
    assert {"rms_norm_lowrank", "glu_lowrank"} <= ran, ran  # the producers ran (interpreter), no Triton LoRA GEMM
    assert not {"lora_linear", "lora_linear_group", "lora_mlp"} & ran, ran
    assert prepared.lora_gemm.buffers(), "no [W | B] buffer was built"
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        assert (g - r).norm() <= 1e-3 * r.norm() + 1e-7


def test_projection_weights_become_views_of_the_buffer(tmp_path):
    model, prepared = micro(tmp_path, "llama")
    assert prepared.lora_gemm.attach(prepared) == 4  # qkv, o, gate_up, down, before any forward
    before = {k: v.data_ptr() for k, v in prepared.lora_gemm.buffers().items()}
    packed_loss(prepared, batch())
    assert {k: v.data_ptr() for k, v in prepared.lora_gemm.buffers().items()} == before  # written once
    layer = prepared.layers[0]
    attn = layer.module.self_attn
    wb = prepared.lora_gemm.buffers()[(id(layer), "qkv")]
    K = attn.q_proj.in_features
    assert wb.shape == (layer.qkv.weight.shape[0], K + 3 * 4)
    assert layer.qkv.weight.data_ptr() == wb.data_ptr() and attn.q_proj.weight.data_ptr() == wb.data_ptr()
    assert attn.k_proj.weight.data_ptr() == wb[attn.q_proj.out_features:].data_ptr()
    assert torch.equal(wb[:, :K], torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))


def _buffers_equal_masters(prepared) -> list[str]:
    """Names of the [W | B] blocks that differ from their float32 master (empty: all equal)."""
    wrong = []
    gemm = prepared.lora_gemm
    for key, aug in gemm._groups.items():
        if aug.wb is None:
            continue
        K = aug.weight.shape[1]
        expect = torch.zeros_like(aug.wb[:, K:])
        for p, off, n, r_off, r in zip(aug.projs, aug.plan.offsets, aug.plan.splits, aug.plan.r_offsets,
                                       aug.plan.ranks, strict=True):
            if r:
                expect[off:off + n, r_off:r_off + r] = p.lora_B.detach()
        if not torch.equal(aug.wb[:, K:], expect):
            wrong.append(str(key[1]))
    return wrong


def _train(prepared, model, steps, lr=1e-2):
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr)
    seen = []
    for i in range(steps):
        train_step(prepared, [batch(seed=i)], opt, params, max_grad_norm=1.0)
        seen.append(_buffers_equal_masters(prepared))
    return seen


def test_b_columns_follow_the_masters_after_every_optimizer_step(tmp_path, reference_kernels):
    model, prepared = micro(tmp_path, "llama", layers=2)
    start = {n: p.lora_B.detach().clone() for n, p in lora_modules(model).items()}
    assert _train(prepared, model, steps=3) == [[], [], []]
    moved = [n for n, p in lora_modules(model).items() if not torch.equal(p.lora_B, start[n])]
    assert len(moved) == len(start)  # the masters did change: the equality above is not trivial
    assert len(prepared.lora_gemm.buffers()) == 8  # qkv, o, gate_up, down per layer


def test_a_skipped_refresh_is_seen_and_the_forward_still_reads_fresh_b(tmp_path, monkeypatch, reference_kernels):
    model, prepared = micro(tmp_path, "llama")
    monkeypatch.setattr(type(prepared.lora_gemm), "refresh", lambda self: None)
    seen = _train(prepared, model, steps=2)
    assert all(seen), "with step.py's refresh skipped the buffers should lag the masters"
    # the forward's version check refreshes before it reads: the loss is still the reference's
    b = batch(seed=9)
    loss = packed_loss(prepared, b)
    assert _buffers_equal_masters(prepared) == []
    ref = packed_loss(reference_of(prepared), b)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_dropout_layers_take_the_existing_path(tmp_path, reference_kernels):
    model, prepared = micro(tmp_path, "llama", dropout=0.1)
    model.train()
    assert not prepared.lora_gemm.runs(prepared.layers[0])
    loss = packed_loss(prepared, batch())
    grads = torch.autograd.grad(loss, lora_parameters(model))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert not prepared.lora_gemm.buffers()  # the layer never took the cuBLAS path
    model.eval()  # dropout is off outside training: the cuBLAS layer takes it
    assert prepared.lora_gemm.runs(prepared.layers[0])


def test_selection(monkeypatch):
    spec = DecoderSpec.from_config(type("C", (), dict(model_type="llama", num_attention_heads=2, num_key_value_heads=1,
                                                      hidden_size=32, intermediate_size=48, rms_norm_eps=1e-6,
                                                      hidden_act="silu", head_dim=16))())
    cpu = torch.device("cpu")
    monkeypatch.delenv("LORAFUSE_LORA_GEMM", raising=False)
    assert resolve("auto", cpu, spec)[0] == "triton"  # CPU keeps today's kernels unless asked
    assert resolve("cublas", cpu, spec) == ("cublas", "cublas (train.lora_gemm)")
    assert resolve("auto", cpu, spec, quantized=True)[0] == "triton"  # NF4: the Triton GEMMs dequantize
    assert resolve("auto", torch.device("meta"), spec)[0] == "triton"  # sharded_load prepares FSDP models on meta
    assert resolve("auto", cpu, spec, kernels="reference")[0] == "triton"
    monkeypatch.setenv("LORAFUSE_LORA_GEMM", "cublas")
    assert resolve("auto", cpu, spec)[0] == "cublas"
    assert resolve("triton", cpu, spec)[0] == "triton"  # the config key wins over the environment
    assert resolve("auto", cpu, spec, quantized=True)[0] == "triton"  # the environment yields to NF4 weights
    assert resolve("auto", cpu, spec, kernels="reference")[0] == "triton"  # and to the reference ops
    with pytest.raises(ValueError, match="NF4"):
        resolve("cublas", cpu, spec, quantized=True)  # the config key does not
    monkeypatch.setenv("LORAFUSE_LORA_GEMM", "fast")
    with pytest.raises(ValueError, match="LORAFUSE_LORA_GEMM"):
        resolve("auto", cpu, spec)


@pytest.mark.parametrize(("override", "clash"), [
    ("quantize=nf4", "quantize"), ("train.parallel=fsdp", "train.parallel"),
    ("train.kernels=reference", "train.kernels")])
def test_config_refuses_cublas_with_nf4_fsdp_and_reference(override, clash):
    assert load_config(None, ["train.lora_gemm=cublas"]).train.lora_gemm == "cublas"
    with pytest.raises(ConfigError, match=f"'{clash}'"):
        load_config(None, ["train.lora_gemm=cublas", override])


def test_training_run_on_the_cublas_path_matches_today_and_says_which(tiny_model_dir, tmp_path, reference_kernels):
    files = {"train": write_ticket_files(tmp_path)["train"]}
    lines = []
    runs = {}
    before = launches["lora_gemm_layer"]
    for path in ("triton", "cublas"):
        # the cuBLAS run recomputes each layer in backward (its Functions run twice per step)
        cfg = tiny_train_config(tiny_model_dir, files, tmp_path / path, max_steps=4, lora_gemm=path,
                                checkpointing="recompute" if path == "cublas" else "none")
        runs[path] = train(cfg, log=lines.append if path == "cublas" else QUIET).train_losses
    assert any(line == "[kernels] LoRA GEMMs: cublas (train.lora_gemm)" for line in lines), lines
    assert launches["lora_gemm_layer"] > before  # the cuBLAS run's layers took the cuBLAS path
    assert len(runs["cublas"]) == len(runs["triton"]) == 4
    for a, b in zip(runs["cublas"], runs["triton"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)
    assert runs["cublas"][-1] != runs["cublas"][0]  # it trained
