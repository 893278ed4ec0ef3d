"""Small models for the tracer bugs a review found: each prunes exactly or is left whole with a
reason of ours, never a crash and never a compacted model that computes something else."""

from __future__ import annotations

import torch
from torch import nn

import structadmm as sa
from structadmm.graph import audit_rules


class TiedEmbedding(nn.Module):
    """An input embedding tied to the output layer (one tensor under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.lm = nn.Linear(16, 50, bias=False)
        self.lm.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(torch.relu(self.out(torch.relu(self.fc(self.emb(tokens))))))


class SharedConv(nn.Module):
    """One conv applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.block(torch.relu(self.block(torch.relu(self.stem(x))))))
        return self.head(x)


class ClampBound(nn.Module):
    """``clamp`` with a per-channel tensor bound."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.low = nn.Parameter(torch.linspace(-0.5, 0.5, 8).view(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.clamp(self.a(x), min=self.low))


class PlainGroupNorm(nn.Module):
    """A GroupNorm without affine parameters: its group count lives in the module alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8, affine=False), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


def prune(model: nn.Module, x: torch.Tensor) -> tuple[sa.PruningPlan, nn.Module]:
    assert audit_rules(model, x) == []
    plan = sa.PruningPlan.uniform(model, x, "filter", 0.5, keep_ends=False)
    plan.project(model)
    return plan, sa.compact(model, x)  # compact raises unless it computes what the masked model does


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_a_tied_embedding_is_left_whole_with_its_reason_and_the_rest_prunes() -> None:
    torch.manual_seed(0)
    model, x = TiedEmbedding().eval(), torch.randint(0, 50, (2, 5))
    plan, small = prune(model, x)
    assert [u.name for u in plan.units] == ["fc"]
    assert any("shared by layers that use it differently" in why for _, why in plan.skipped), plan.skipped
    assert small.lm.weight is small.emb.weight and params(small) < params(model)


def test_a_conv_applied_twice_is_cut_once() -> None:
    torch.manual_seed(0)
    model, x = SharedConv().eval(), torch.randn(2, 3, 8, 8)
    plan, small = prune(model, x)
    assert plan.units and small.block.weight.shape[0] == small.block.weight.shape[1] < 8


def test_a_clamp_bound_is_cut_with_the_channels_it_bounds() -> None:
    torch.manual_seed(0)
    model, x = ClampBound().eval(), torch.randn(2, 3, 4, 4)
    plan, small = prune(model, x)
    assert [u.name for u in plan.units] == ["a"] and small.low.shape[1] == small.a.out_channels == 4


def test_a_group_norm_without_affine_parameters_is_left_whole() -> None:
    torch.manual_seed(0)
    model, x = PlainGroupNorm().eval(), torch.randn(2, 3, 4, 4)
    plan, small = prune(model, x)
    assert not plan.units and any("group norm without affine parameters" in why for _, why in plan.skipped)
    assert small.norm.num_groups == 4 and small.a.out_channels == 8


class CachedBias(nn.Module):
    """Caches a value computed in forward() in a dict while in eval mode (timm's LeViT and
    EfficientFormer cache their attention biases so)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.table = nn.Parameter(torch.randn(8))
        self.cache: dict[str, torch.Tensor] = {}

    def bias(self) -> torch.Tensor:
        if self.training:
            return self.table.view(1, -1, 1, 1)
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.table.view(1, -1, 1, 1) * 1.0
        return self.cache["cpu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x) + self.bias()))


def test_a_cache_filled_in_forward_while_tracing_is_emptied_again() -> None:
    """The trace's fake tensors must not stay in a module's cache: nothing could run or copy it."""
    torch.manual_seed(0)
    model, x = CachedBias().eval(), torch.randn(2, 3, 4, 4)
    sa.PruningPlan.uniform(model, x, "filter", 0.5, keep_ends=False)
    assert model.cache == {}
    plan, small = prune(model, x)  # compact traces and deep-copies the model
    assert all(type(v) is torch.Tensor for v in small.cache.values())
