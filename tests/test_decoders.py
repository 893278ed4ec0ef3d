"""Decoder language models from transformers with their default configs (caches on): the
library switches caches off while it traces, compacts and exports, and gives them back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import structadmm as sa
from structadmm.exporters import count_torch

transformers = pytest.importorskip("transformers")


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # grouped-query attention
    return transformers.LlamaForCausalLM(config).eval()


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_a_llama_with_its_cache_on_prunes_exactly_and_keeps_its_cache_setting(tmp_path: Path) -> None:
    model, x = llama(), torch.randint(0, 128, (1, 16))
    assert model.config.use_cache
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    assert model.config.use_cache  # given back after the trace
    assert any("mlp" in u.name for u in plan.units), plan.skipped
    plan.project(model)
    small = sa.compact(model, x)  # checks the compacted model against the masked one
    assert count_torch(model, x).macs / count_torch(small, x).macs >= 1.5
    sa.export_onnx(small, x, tmp_path / "pruned.onnx")  # a batch of one exported with a dynamic batch axis
    sa.verify_onnx(model, tmp_path / "pruned.onnx", torch.randint(0, 128, (3, 16)))
    assert small.config.use_cache and model.config.use_cache


def test_gpt2s_transposed_linear_layers_prune(tmp_path: Path) -> None:
    """GPT-2's Conv1D is ``addmm`` with its weight stored [in, out]; its MLP neurons prune and the
    layer's ``nf`` follows its weight."""
    model, x = gpt2(), torch.randint(0, 128, (1, 16))
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    assert {u.name for u in plan.units} >= {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}, plan.skipped
    plan.project(model)
    small = sa.compact(model, x)
    fc = small.transformer.h[0].mlp.c_fc
    assert fc.nf == fc.weight.shape[1] == 128 and small.transformer.h[0].mlp.c_proj.nx == 128
    assert count_torch(model, x).macs > count_torch(small, x).macs
