"""Transformers: attention heads and MLP neurons pruned, compacted exactly and exported.

Small configurations of each family (timm ViT, DeiT and Swin, torchvision ViT and Swin, a
BERT encoder from ``transformers``) go through README's public flow (benchmarks/model_zoos.py):
plan, ADMM steps, hard prune, guard, compact, export, ONNX Runtime parity with the masked model.
The compacted modules must carry the head counts of the heads they kept and run at other batch
sizes and sequence lengths.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import structadmm as sa
from structadmm.graph.heads import HeadAttention, heads_attention
from structadmm.graph.norms import WidthLayerNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_zoos  # noqa: E402

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")


def small_vit() -> tuple[nn.Module, torch.Tensor]:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=4,
                             embed_dim=64), torch.randn(2, 3, 32, 32)


def small_deit() -> tuple[nn.Module, torch.Tensor]:  # class and distillation tokens, two heads
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=4,
                             embed_dim=64), torch.randn(2, 3, 32, 32)


def small_swin() -> tuple[nn.Module, torch.Tensor]:  # shifted windows, relative position bias
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=32,
                             depths=(2, 2), num_heads=(2, 4)), torch.randn(2, 3, 32, 32)


def small_tv_vit() -> tuple[nn.Module, torch.Tensor]:  # nn.MultiheadAttention
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: outputs would be the bias alone
    return model, torch.randn(2, 3, 32, 32)


def small_tv_swin() -> tuple[nn.Module, torch.Tensor]:
    return torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10), \
        torch.randn(2, 3, 32, 32)


def small_bert() -> tuple[nn.Module, torch.Tensor]:
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config, add_pooling_layer=False), torch.randint(0, 100, (2, 16))


def small_distilbert() -> tuple[nn.Module, torch.Tensor]:  # q_lin/k_lin/v_lin, heads split with its own code
    config = transformers.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                           max_position_embeddings=64)
    return transformers.DistilBertModel(config), torch.randint(0, 100, (2, 16))


def small_hf_vit() -> tuple[nn.Module, torch.Tensor]:
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128)
    return transformers.ViTModel(config, add_pooling_layer=False), torch.randn(2, 3, 32, 32)


FAMILIES = {"timm-vit": small_vit, "timm-deit": small_deit, "timm-swin": small_swin,
            "torchvision-vit": small_tv_vit, "torchvision-swin": small_tv_swin, "bert": small_bert,
            "distilbert": small_distilbert, "transformers-vit": small_hf_vit}


def heads_of(model: nn.Module, head_dims: dict[str, int] | None = None) -> list[tuple[str, int, int]]:
    """(module, num_heads attribute, heads its projection holds) for every attention module.

    A module that does not store its head width (timm's Swin ``WindowAttention``) is measured with
    the width its dense version had (``head_dims``, from :func:`head_dims_of`); heads are cut
    whole, so the width stays and the projection's rows count the heads it holds.
    """
    found = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            width = m.head_dim if isinstance(getattr(m, "head_dim", None), int) else (head_dims or {}).get(name)
            if width is None:
                raise AssertionError(f"{name} stores no head width: measure it with its dense model's")
            found.append((name, m.num_heads, m.qkv.out_features // (3 * width)))
        elif isinstance(m, HeadAttention):
            found.append((name, m.num_heads, m.in_proj_weight.shape[0] // (3 * m.head_dim)))
        elif isinstance(getattr(m, "num_attention_heads", None), int) and hasattr(m, "query"):
            found.append((name, m.num_attention_heads, m.query.out_features // m.attention_head_size))
    return found


def head_dims_of(dense: nn.Module) -> dict[str, int]:
    """The head width of every qkv attention module of a dense model (rows / (3 * heads))."""
    return {name: m.qkv.out_features // (3 * m.num_heads) for name, m in dense.named_modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)}


# torchvision's Swin runs with the slow suite; timm's Swin (shifted windows, relative position bias) stays fast
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "torchvision-swin" else f
                                    for f in FAMILIES])
def test_family_prunes_heads_and_neurons_exactly_through_onnx(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, x = FAMILIES[family]()
    result = model_zoos.readme_flow(model, x, tmp_path)
    assert result["units"] > 0
    assert result["mac_saving"] >= 0.2, result
    assert result["parity_ok"], result  # pruned.onnx computes what the masked model computes


@pytest.mark.parametrize("family", ["timm-vit", "timm-swin", "torchvision-vit", "bert"])
def test_head_counts_follow_the_kept_heads(family: str) -> None:
    torch.manual_seed(0)
    model, x = FAMILIES[family]()
    model.eval()
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    head_units = [u for u in plan.units if u.group.size in {2, 4}]  # every attention here has 2 or 4 heads
    assert head_units, [(u.name, u.group.size) for u in plan.units]
    plan.project(model)  # zeroes the pruned weights in place
    dense = heads_attention(copy.deepcopy(model))
    widths = head_dims_of(dense)
    before = {name: heads for name, heads, held in heads_of(dense, widths) if heads == held}
    small = sa.compact(model, x)
    after = heads_of(small, widths)
    assert len(before) == len(after) > 0, (before, after)
    assert all(attr == held for _, attr, held in after), after  # the attribute says what it holds
    assert {name: heads for name, heads, _ in after} == {name: n // 2 for name, n in before.items()}, (before, after)


def test_compacted_bert_runs_at_other_batch_sizes_and_sequence_lengths() -> None:
    torch.manual_seed(0)
    model, x = small_bert()
    model.eval()
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    plan.project(model)  # zeroes the pruned weights in place
    small = sa.compact(model, x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        for shape in ((1, 7), (5, 33)):
            ids = torch.randint(0, 100, shape)
            mask = torch.ones(shape, dtype=torch.long)
            mask[:, -2:] = 0  # padding: the attention mask reaches the pruned heads too
            expected = model(ids, attention_mask=mask).last_hidden_state
            got = small(ids, attention_mask=mask).last_hidden_state
            assert torch.allclose(got, expected, atol=1e-5), (shape, (got - expected).abs().max())


def test_compacted_vit_runs_at_other_batch_sizes() -> None:
    torch.manual_seed(0)
    model, x = small_tv_vit()
    model.eval()
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    plan.project(model)  # zeroes the pruned weights in place
    small = sa.compact(model, x)
    with torch.no_grad():
        for batch in (1, 5):
            inputs = torch.randn(batch, 3, 32, 32)
            assert torch.allclose(small(inputs), model(inputs), atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_head_attention_computes_what_multihead_attention_computes(batch_first: bool, need_weights: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    ours = HeadAttention(mha).eval()
    assert ours.in_proj_weight is mha.in_proj_weight and ours.out_proj is mha.out_proj  # the same parameters
    x = torch.randn(3, 5, 32) if batch_first else torch.randn(5, 3, 32)
    memory = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -3:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    cases = [((x, x, x), {}), ((x, memory, memory), {"key_padding_mask": padding}),
             ((x, x, x), {"attn_mask": causal}), ((x, x, x), {"attn_mask": causal.float() * -1e4}),
             ((x[:, 0] if batch_first else x[:, 0], x[:, 0], x[:, 0]), {})]
    with torch.no_grad():
        for args, kwargs in cases:
            expected, expected_weights = mha(*args, need_weights=need_weights, **kwargs)
            got, got_weights = ours(*args, need_weights=need_weights, **kwargs)
            assert torch.allclose(got, expected, atol=1e-5), kwargs
            assert (got_weights is None) == (expected_weights is None)
            if got_weights is not None:
                assert torch.allclose(got_weights, expected_weights, atol=1e-5)


def test_tracing_puts_the_users_attention_back() -> None:
    model, x = small_tv_vit()
    before = [type(m) for m in model.modules()]
    sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    assert [type(m) for m in model.modules()] == before
    assert any(type(m) is nn.MultiheadAttention for m in model.modules())


def bert_classifier() -> tuple[nn.Module, torch.Tensor]:  # BertModel's output is the stream itself
    model, x = small_bert()
    return transformers.BertForSequenceClassification(model.config), x


@pytest.mark.parametrize("family", ["timm-vit", "torchvision-vit", "bert"])
def test_residual_stream_is_one_optional_group_pruned_exactly(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = bert_classifier() if family == "bert" else FAMILIES[family]()
    model.eval()
    without = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5, keep_ends=True)
    # asked for, the stream is pruned even where the first layer (a patch embedding) writes it
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5, residual=True, keep_ends=True)
    width = 64  # every small model here has a 64-wide residual stream
    stream = [u for u in plan.units if u.group.size == width and u.group.id in plan.graph.normalised]
    assert len(stream) == 1, [(u.name, u.group.size) for u in plan.units]  # one group across every block
    assert {u.group.id for u in without.units} == {u.group.id for u in plan.units} - {stream[0].group.id}
    plan.project(model)
    small = sa.compact(model, x)
    norms = [m for m in small.modules() if isinstance(m, WidthLayerNorm)]
    assert norms and all(m.weight.shape[0] == width // 2 and m.width == width for m in norms)
    result = sa.export_onnx(small, x, tmp_path / "pruned.onnx")  # ONNX Runtime against torch
    with torch.no_grad():
        expected, got = model(x), small(x)
    expected = expected if isinstance(expected, torch.Tensor) else expected[0]
    got = got if isinstance(got, torch.Tensor) else got[0]
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4


def test_a_stream_that_is_not_zero_keeps_its_channels() -> None:
    # readers all zero but the stream itself is not: a LayerNorm's statistics still read it
    torch.manual_seed(0)
    model, x = small_vit()
    model.eval()
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5, residual=True)
    stream = next(u for u in plan.units if u.group.id in plan.graph.normalised)
    with torch.no_grad():
        for s, pos, local in plan.graph.slices_of(stream.group):
            if s.role == "in":
                tensor = plan.graph.tensor(s)
                keep = torch.ones(len(s.entries), dtype=torch.bool)
                keep[torch.from_numpy(pos[local < 8])] = False
                tensor.mul_(s.mask(tensor.shape, keep))
    small = sa.compact(model, x)
    assert not any(isinstance(m, WidthLayerNorm) for m in small.modules())
    assert small.norm.weight.shape[0] == 64
