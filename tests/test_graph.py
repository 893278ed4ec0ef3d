"""The channel graph finds coupled groups from the trace alone, and freezes what it cannot prune."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nets import NETS, Concat, Depthwise, Residual
from structadmm.errors import StructADMMError
from structadmm.models import DigitsCNN
from structadmm.graph.trace import trace
from structadmm.prune.plan import PruningPlan


def members(graph, group) -> set[tuple[str, str, str]]:
    return {(s.module, s.tensor, s.role) for s, _, _ in graph.slices_of(group)}


def positions(graph, group, module: str) -> list[int]:
    """Positions of ``module``'s input axis that belong to ``group``."""
    return [p for s, pos, _ in graph.slices_of(group) if s.module == module and s.role == "in" for p in pos.tolist()]


def test_chain_groups_couple_bn_and_flatten() -> None:
    graph = trace(DigitsCNN(), torch.randn(2, 1, 16, 16))
    by_name = {g.name: g for g in graph.groups}
    last_conv = by_name["features.14"]
    assert last_conv.prunable and last_conv.size == 128
    assert {("features.15", t, "through") for t in ("weight", "bias", "running_mean", "running_var")} <= members(graph, last_conv)
    assert positions(graph, last_conv, "classifier.1") == list(range(512))  # flatten: 2x2 features per channel
    flat = next(s for s in graph.slices if s.module == "classifier.1" and s.role == "in")
    assert [int(graph.local_of[graph.atom_of[e]]) for e in flat.entries[:8]] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert by_name["classifier.3"].frozen == "model output"
    assert sum(g.prunable for g in graph.groups) == 6


def test_residual_add_merges_branches_into_one_group() -> None:
    graph = trace(Residual(), torch.randn(1, 3, 8, 8))
    stem = next(g for g in graph.groups if "stem.0" in g.producers)
    assert set(stem.producers) == {"stem.0", "a1.2", "a2.2"}
    assert {"a1.0", "a2.0", "b.0", "short"} <= set(stem.consumers)
    assert stem.size == 8  # tied position by position, not concatenated
    stage2 = next(g for g in graph.groups if "short" in g.producers)
    assert set(stage2.producers) == {"b.2", "short"} and stage2.consumers == ["head"]


def test_concat_gives_consumers_offsets() -> None:
    graph = trace(Concat(), torch.randn(1, 3, 8, 8))
    by_name = {g.name: g for g in graph.groups}
    assert positions(graph, by_name["b1.0"], "fuse") == list(range(0, 6))
    assert positions(graph, by_name["stem"], "fuse") == list(range(6, 14))
    assert positions(graph, by_name["b2.0"], "fuse") == list(range(14, 18))


def test_depthwise_and_squeeze_excitation_share_the_expanded_group() -> None:
    graph = trace(Depthwise(), torch.randn(1, 3, 8, 8))
    expanded = next(g for g in graph.groups if "expand.0" in g.producers)
    assert set(expanded.producers) == {"expand.0", "se2"}  # the gate multiplies the same channels
    through = {m for m, _, role in members(graph, expanded) if role == "through"}
    assert {"dw.0", "dw.1", "expand.1"} <= through
    assert set(expanded.consumers) == {"se1", "project.0"}


def test_unknown_op_freezes_only_what_it_touches() -> None:
    class Sliced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return self.c(y[:, :4])

    plan = PruningPlan.uniform(Sliced(), torch.randn(1, 3, 10, 10), "filter", 0.5)
    assert [u.name for u in plan.units] == ["a"]
    assert any("selects channels" in why for layer, why in plan.skipped if layer.startswith("b"))
    assert any("selects channels" in note for note in plan.graph.notes)


def test_untraceable_model_is_a_clear_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return self.conv(-x)

    with pytest.raises(StructADMMError, match="cannot trace Branchy"):
        trace(Branchy(), torch.randn(1, 3, 8, 8))


def test_wrong_input_shape_is_a_clear_error() -> None:
    with pytest.raises(StructADMMError, match="does not fit DigitsCNN"):
        trace(DigitsCNN(), torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("name", sorted(NETS))
def test_every_test_net_has_prunable_groups(name: str) -> None:
    build, shape = NETS[name]
    graph = trace(build(), torch.randn(shape))
    assert graph.prunable_groups()
    assert not graph.notes, graph.notes


def test_padding_the_channel_axis_freezes_what_it_pads() -> None:
    class ChannelPad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(10, 6, 3), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            y = nn.functional.pad(torch.relu(self.a(x)), (0, 0, 0, 0, 1, 1))  # two zero channels
            return self.c(torch.relu(self.b(y)))

    plan = PruningPlan.uniform(ChannelPad(), torch.randn(1, 3, 10, 10), "filter", 0.5)
    assert [u.name for u in plan.units] == ["b"]
    assert any(layer.startswith("a") and "padding of the channel axis" in why for layer, why in plan.skipped)


def test_functional_batch_norm_in_a_custom_module_is_pruned() -> None:
    class BatchNormAct(nn.BatchNorm2d):  # the timm pattern: F.batch_norm on the module's own tensors
        def forward(self, x):
            y = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                         self.training, self.momentum, self.eps)
            return nn.functional.silu(y)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct(8), nn.Conv2d(8, 4, 3))
    graph = trace(model, torch.randn(1, 3, 8, 8))
    group = next(g for g in graph.groups if g.name == "0")
    assert group.prunable
    assert {("1", t, "through") for t in ("weight", "bias", "running_mean", "running_var")} <= members(graph, group)


def test_a_layer_used_twice_ties_its_uses_and_compacts_exactly() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            y = torch.relu(self.b(y))
            return self.head(torch.relu(self.b(y)))

    torch.manual_seed(0)
    model, x = Shared(), torch.randn(2, 3, 8, 8)
    plan = PruningPlan.uniform(model, x, "filter", 0.5)
    (unit,) = plan.units
    assert set(unit.group.producers) == {"a", "b"} and unit.group.size == 8
    plan.project(model)
    from structadmm.prune.surgery import compact

    small = compact(model, x)
    assert small.a.out_channels == small.b.in_channels == small.b.out_channels == small.head.in_channels == 4


def test_a_count_written_in_forward_is_probed_and_frozen_but_a_computed_one_is_not() -> None:
    class Views(nn.Module):
        def __init__(self, literal: bool) -> None:
            super().__init__()
            self.literal = literal
            self.a, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

        def forward(self, x):
            y = self.a(x).mean((2, 3))
            y = y.view(-1, 8) if self.literal else y.view(-1, y.shape[1])
            return self.head(y)

    x = torch.randn(2, 3, 8, 8)
    assert [u.name for u in PruningPlan.uniform(Views(False), x, "filter", 0.5).units] == ["a"]
    literal = PruningPlan.uniform(Views(True), x, "filter", 0.5)
    assert not literal.units
    assert any("fixed count" in why for _, why in literal.skipped)


def test_a_parameter_reshaped_in_forward_follows_the_channels() -> None:
    class LayerScale2d(nn.Module):  # the timm pattern: gamma.view(1, -1, 1, 1) in forward()
        def __init__(self, c: int) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.rand(c) + 0.5)

        def forward(self, x):
            return x * self.gamma.view(1, -1, 1, 1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), LayerScale2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 9, 9)
    graph = trace(model, x)
    group = next(g for g in graph.groups if g.name == "0")
    assert group.prunable and ("1", "gamma", "through") in members(graph, group)
    PruningPlan.uniform(model, x, "filter", 0.5).project(model)
    from structadmm.prune.surgery import compact

    small = compact(model, x)
    assert small[1].gamma.shape == (4,) and small[3].in_channels == 4


def test_per_channel_values_it_cannot_follow_freeze_the_channels() -> None:
    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

        def forward(self, x):
            return self.b(self.a(x) * torch.arange(8.0).view(1, -1, 1, 1))  # a per-channel constant

    plan = PruningPlan.uniform(Computed(), torch.randn(1, 3, 9, 9), "filter", 0.5)
    assert not any(u.name == "a" for u in plan.units)
    assert any("cannot follow" in why for _, why in plan.skipped)


class TinyAttention(nn.Module):
    """Separate q/k/v Linears, heads split with a computed count, attention written out by hand."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.head_dim = dim // heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, -1))


def test_heads_are_channels_of_one_group_over_q_k_v_and_the_output_columns() -> None:
    graph = trace(TinyAttention(), torch.randn(2, 5, 16))
    heads = next(g for g in graph.groups if "q" in g.producers)
    assert heads.prunable and heads.size == 4 and set(heads.producers) == {"q", "k", "v"}
    # every head is 4 rows of q, of k and of v and 4 input columns of the output projection
    out_columns = next(local for s, _, local in graph.slices_of(heads) if s.module == "out" and s.role == "in")
    assert out_columns.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


class TokenStream(nn.Module):
    """Patches -> class token joined on the token axis -> position embedding -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.fc(x[:, 0])


def test_class_token_and_position_embedding_follow_the_channels() -> None:
    graph = trace(TokenStream(), torch.randn(2, 3, 8, 8))
    stream = next(g for g in graph.groups if "patch" in g.producers)
    assert stream.prunable
    assert {("", "cls_token", "through"), ("", "pos_embed", "through")} <= members(graph, stream)
    axes = {s.tensor: s.axis for s, _, _ in graph.slices_of(stream) if s.role == "through"}
    assert axes == {"cls_token": 2, "pos_embed": 2}


class AfterUnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.cumprod(-1))))  # cumprod has no rule


def test_a_layer_reading_what_the_rules_cannot_follow_still_loses_outputs() -> None:
    graph = trace(AfterUnknownOp(), torch.randn(2, 6))
    hidden = next(g for g in graph.groups if "fc1" in g.producers)
    assert hidden.prunable and hidden.size == 8
    inputs = next(g for g in graph.groups if "fc1" in g.consumers)
    assert not inputs.prunable


class SpatialGather(nn.Module):
    """Rows and columns picked by index tensors behind a permute (ONNX GatherND converted to torch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 2 * 2, 4)
        self.register_buffer("rows", torch.tensor([0, 2]))
        self.register_buffer("cols", torch.tensor([1, 3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(2, 3, 0, 1)[self.rows[:, None], self.cols[None, :]]  # [2, 2, B, C]
        return self.fc(y.permute(2, 3, 0, 1).flatten(1))


def test_a_gather_on_other_axes_keeps_the_channels() -> None:
    model, x = SpatialGather().eval(), torch.randn(2, 3, 6, 6)
    plan = PruningPlan.uniform(model, x, "filter", 0.5)
    assert [u.group.size for u in plan.units] == [8]
    plan.project(model)
    from structadmm.prune.surgery import compact
    small = compact(model, x)
    assert small.conv.out_channels == 4 and small.fc.in_features == 16
