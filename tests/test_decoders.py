"""Decoder language models from transformers with their default configs (caches on): the
library switches caches off while it traces, compacts and exports, and gives them back. Heads
(a key/value head with its query group) and MLP neurons prune; the compacted model generates what
the masked one does, and its ``config`` describes it, so ``save_pretrained``/``from_pretrained``
rebuild it; where the config cannot (GPT-2's head width), compaction says so in one line."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

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


def qwen2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # biases on q, k and v
    return transformers.Qwen2ForCausalLM(config).eval()


def mistral() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)
    return transformers.MistralForCausalLM(config).eval()


DECODERS = {"llama": llama, "qwen2": qwen2, "mistral": mistral, "gpt2": gpt2}


def pruned(model: torch.nn.Module, x: torch.Tensor, layers: dict | None = None) -> torch.nn.Module:
    """``model`` projected in place (the masked model) and its compacted copy (checked against it)."""
    plan = sa.PruningPlan.from_dict(model, x, layers or {"*": {"sparsity": "filter", "ratio": 0.5}})
    plan.project(model)
    return sa.compact(model, x)


def greedy(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Four greedy tokens with the cache on, and the logits each was chosen from."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def round_trip(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    model.save_pretrained(folder)
    return type(model).from_pretrained(folder).eval()


@pytest.mark.slow  # docs/guides/deployed-models.md runs a pruned Llama's generate() with the cache on, in the fast suite
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


def test_gpt2s_attention_heads_prune_with_the_split_sizes_it_holds() -> None:
    """GPT-2 splits its fused projection into q, k and v with ``split_size``, a module attribute:
    the heads prune (a head's q, k and v together) and the attribute follows the cut."""
    model, x = gpt2(), torch.randint(0, 128, (1, 16))
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    heads = {u.name: u.group.size for u in plan.units if "attn" in u.name}
    assert heads == {"transformer.h.0.attn.c_attn": 4, "transformer.h.1.attn.c_attn": 4}, plan.skipped
    plan.project(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = sa.compact(model, x)
    attn = small.transformer.h[0].attn
    assert attn.c_attn.nf == 96 and attn.split_size == 32 and attn.num_heads == 2 and attn.c_proj.nx == 32
    assert count_torch(model, x).macs / count_torch(small, x).macs >= 1.5
    # GPT2Config derives the head width from n_embd / n_head: it cannot hold 2 heads of 16 in 64
    messages = [str(w.message) for w in caught if isinstance(w.message, sa.StructADMMWarning)]
    assert len(messages) == 1 and "GPT2Config" in messages[0] and "c_attn" in messages[0], messages
    assert small.config.n_head == 4 and small.config.n_inner is None  # left as it was, not half-written
    ids = torch.randint(0, 128, (1, 5))
    (tokens, logits), (expected_tokens, expected_logits) = greedy(small, ids), greedy(model, ids)
    assert torch.equal(tokens, expected_tokens) and torch.allclose(logits, expected_logits, atol=1e-4)


def test_gpt2_with_its_mlp_pruned_round_trips(tmp_path: Path) -> None:
    """Pruning only the MLP, GPT-2's config can say it (``n_inner``): save_pretrained round-trips."""
    model, x = gpt2(), torch.randint(0, 128, (1, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.StructADMMWarning)
        small = pruned(model, x, {"*.mlp.*": {"sparsity": "filter", "ratio": 0.5}})
    assert small.config.n_inner == 128 and small.config.n_head == 4
    loaded = round_trip(small, tmp_path / "gpt2")
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)


def test_a_pruned_llama_generates_and_round_trips_with_its_config(tmp_path: Path) -> None:
    model, x = llama(), torch.randint(0, 128, (1, 16))
    small = pruned(model, x)
    config = small.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == \
        (2, 1, 16, 64)  # one key/value head of two, with its query group; half the MLP
    assert (config.hidden_size, model.config.num_attention_heads, model.config.intermediate_size) == (64, 4, 128)
    assert small.model.layers[0].mlp.intermediate_size == 64
    assert count_torch(model, x).macs / count_torch(small, x).macs >= 1.5
    ids = torch.randint(0, 128, (1, 5))
    assert small.config.use_cache  # generate() runs with the cache, as the user had it
    (tokens, logits), (expected_tokens, expected_logits) = greedy(small, ids), greedy(model, ids)
    assert tokens.shape == (1, 9) and torch.equal(tokens, expected_tokens)
    assert torch.allclose(logits, expected_logits, atol=1e-4)
    loaded = round_trip(small, tmp_path / "llama")
    assert loaded.config.num_key_value_heads == 1
    with torch.no_grad():
        ids = torch.randint(0, 128, (3, 11))
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)


def test_layers_of_different_sizes_leave_the_config_as_it_was() -> None:
    """A config holds one MLP width for every layer: layers cut differently are refused in one line."""
    model, x = llama(), torch.randint(0, 128, (1, 16))
    layers = {"*.layers.0.mlp.*": {"sparsity": "filter", "ratio": 0.5},
              "*.layers.1.mlp.*": {"sparsity": "filter", "ratio": 0.25}}
    with pytest.warns(sa.StructADMMWarning, match="layers keep different sizes .*intermediate_size"):
        small = pruned(model, x, layers)
    assert small.config.intermediate_size == 128
    assert [layer.mlp.intermediate_size for layer in small.model.layers] == [64, 96]


class SplitBySize(nn.Module):
    """Splits a projection into pieces of ``split_size``, an attribute of its own."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.split_size, self.literal = 8, literal
        self.proj, self.out = nn.Linear(16, 24), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.proj(x).split(8 if self.literal else self.split_size, dim=-1)
        return self.out(torch.relu(a) * b + c)


def test_a_split_size_held_in_an_attribute_follows_the_cut_and_a_literal_one_freezes() -> None:
    torch.manual_seed(0)
    model, x = SplitBySize().eval(), torch.randn(2, 16)
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    assert [(u.name, u.group.size) for u in plan.units] == [("proj", 8)]  # column i of a, b and c: one channel
    plan.project(model)
    small = sa.compact(model, x)
    assert small.split_size == 4 and small.proj.out_features == 12 and small.out.in_features == 4
    literal = SplitBySize(literal=True).eval()
    plan = sa.PruningPlan.uniform(literal, x, sparsity="filter", ratio=0.5)
    assert not plan.units and any("fixed count" in why for _, why in plan.skipped), plan.skipped


@pytest.mark.slow
@pytest.mark.parametrize("family", DECODERS)
def test_decoder_prunes_generates_round_trips_and_exports(family: str, tmp_path: Path) -> None:
    """Each family from a small default-style config: heads and MLP neurons pruned (>= 1.5x fewer
    MACs), greedy generation with the cache agrees with the masked model, the saved checkpoint
    (GPT-2: its MLP alone, see above) rebuilds it, and the ONNX export computes what it computes."""
    model, x = DECODERS[family](), torch.randint(0, 128, (1, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.StructADMMWarning)  # GPT-2's config: tested above
        small = pruned(model, x)
    assert count_torch(model, x).macs / count_torch(small, x).macs >= 1.5
    ids = torch.randint(0, 128, (2, 6))
    (tokens, logits), (expected_tokens, expected_logits) = greedy(small, ids), greedy(model, ids)
    assert torch.equal(tokens, expected_tokens) and torch.allclose(logits, expected_logits, atol=1e-4)
    if family != "gpt2":
        loaded = round_trip(small, tmp_path / family)
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)
    sa.export_onnx(small, x, tmp_path / "pruned.onnx")
    assert sa.verify_onnx(model, tmp_path / "pruned.onnx", torch.randint(0, 128, (3, 16))) < 1e-4
