"""The projections are the true Euclidean projections onto their sparsity sets."""

from __future__ import annotations

import itertools

import pytest
import torch

from structadmm.errors import StructADMMError
from structadmm.prune.sparsity import Sparsity, check_ratio, keep_count, parse_sparsity, project_columns, project_irregular


def brute_force(weight: torch.Tensor, groups: list[torch.Tensor], k: int) -> torch.Tensor:
    """The closest point to ``weight`` with at most k of the (boolean-mask) groups non-zero."""
    best, best_dist = None, float("inf")
    for kept in itertools.combinations(range(len(groups)), k):
        keep = torch.zeros_like(weight, dtype=torch.bool)
        for g in kept:
            keep |= groups[g]
        candidate = weight * keep
        dist = float((weight - candidate).pow(2).sum())
        if dist < best_dist - 1e-12:
            best, best_dist = candidate, dist
    return best


@pytest.mark.parametrize("seed", range(5))
def test_column_projection_is_euclidean(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 2, 2, 2, generator=gen)  # 8 columns
    groups = []
    for c, i, j in itertools.product(range(2), range(2), range(2)):
        g = torch.zeros_like(w, dtype=torch.bool)
        g[:, c, i, j] = True
        groups.append(g)
    for ratio in (0.25, 0.5, 0.75):
        k = keep_count(8, ratio)
        ours = w * project_columns(w, ratio)
        assert torch.equal(ours, brute_force(w, groups, k))
        assert int(project_columns(w, ratio)[0].sum()) == k


@pytest.mark.parametrize("seed", range(5))
def test_irregular_projection_is_euclidean(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 4, generator=gen)
    groups = [torch.nn.functional.one_hot(torch.tensor(i), 8).view(2, 4).bool() for i in range(8)]
    ours = w * project_irregular(w, 0.5)
    assert torch.equal(ours, brute_force(w, groups, 4))


@pytest.mark.parametrize("seed", range(4))
def test_coupled_channel_projection_is_euclidean(seed: int) -> None:
    """A filter group of conv1 spans conv1's rows, its bias and conv2's input columns."""
    from structadmm.prune.plan import PruningPlan

    net = torch.nn.Sequential(torch.nn.Conv2d(2, 5, 3), torch.nn.ReLU(), torch.nn.Conv2d(5, 3, 1))
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen))
    plan = PruningPlan.from_dict(net, torch.randn(1, 2, 6, 6), {"0": {"sparsity": "filter", "ratio": 0.6}})
    params = {n: p.detach() for n, p in net.named_parameters()}
    names = plan.param_names()
    assert names == ["0.bias", "0.weight", "2.weight"]
    flat = torch.cat([params[n].flatten() for n in names])
    groups = []
    for c in range(5):
        parts = [torch.zeros_like(params[n], dtype=torch.bool) for n in names]
        parts[0][c] = True
        parts[1][c] = True
        parts[2][:, c] = True
        groups.append(torch.cat([p.flatten() for p in parts]))
    masks = plan.masks_for(params)
    ours = torch.cat([(params[n] * masks[n]).flatten() for n in names])
    assert torch.equal(ours, brute_force(flat, groups, keep_count(5, 0.6)))


def test_sequential_combination_prunes_columns_of_what_is_left() -> None:
    from structadmm.prune.plan import PruningPlan

    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    plan = PruningPlan.from_dict(net, torch.randn(1, 4, 8, 8), {"2": {"sparsity": "channel+shape", "ratio": 0.5}})
    masks = plan.project(net)
    w = net[2].weight
    alive_channels = w.ne(0).flatten(2).any(2).any(0)
    assert int(alive_channels.sum()) == 4  # half of the 8 input channels
    alive_columns = w.ne(0).any(0)
    assert int(alive_columns.sum()) == keep_count(4 * 9, 0.5)  # half of the surviving 36 columns
    assert torch.equal(masks["2.weight"].bool(), w.ne(0))


def test_parse_sparsity_and_ratio() -> None:
    assert parse_sparsity("shape+filter") == (Sparsity.FILTER, Sparsity.SHAPE)
    with pytest.raises(StructADMMError, match="unknown sparsity type 'rows'"):
        parse_sparsity("filter+rows")
    for bad in (0, 1, 1.5, -0.1, "x"):
        with pytest.raises(StructADMMError, match="ratio"):
            check_ratio(bad)
    assert keep_count(10, 0.99) == 1


def test_keep_count_rounds_up_to_kernel_friendly_multiples() -> None:
    assert keep_count(100, 0.5, 16) == 64
    assert keep_count(24, 0.5, 16) == 16
    assert keep_count(144, 0.5, 16) == 80
    assert keep_count(8, 0.5, 16) == 8  # narrower than one block: left whole
    assert keep_count(64, 0.9375, 16) == 16  # never below one block
    assert keep_count(96, 0.5, 8) == 48
