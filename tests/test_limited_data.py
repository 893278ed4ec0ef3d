"""The reusable pieces of benchmarks/limited_data.py: the unlabeled subset and the paired interval."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from limited_data import paired_interval, unlabeled_subset  # noqa: E402


def test_unlabeled_subset_draws_n_distinct_inputs_without_labels():
    x = torch.arange(100, dtype=torch.float32).reshape(100, 1)
    data = TensorDataset(x, torch.arange(100) % 10)
    sub = unlabeled_subset(data, 30, seed=3)
    assert len(sub.tensors) == 1  # inputs only: the labels are hidden
    values = sub.tensors[0].flatten().tolist()
    assert len(values) == 30 and len(set(values)) == 30 and set(values) <= set(range(100))
    again = unlabeled_subset(data, 30, seed=3).tensors[0]
    other = unlabeled_subset(data, 30, seed=4).tensors[0]
    assert torch.equal(again, sub.tensors[0]) and not torch.equal(other, sub.tensors[0])
    assert sorted(unlabeled_subset(data, 100, seed=0).tensors[0].flatten().tolist()) == list(range(100))
    with pytest.raises(ValueError):
        unlabeled_subset(data, 101, seed=0)


def test_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    a = {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.95}
    b = {0: 0.89, 1: 0.90, 2: 0.91, 3: 0.92, 9: 0.5}  # seed 9 is unpaired: left out
    p = paired_interval(a, b)
    assert p["n"] == 4 and p["seeds"] == [0, 1, 2, 3]
    assert p["diffs_pt"] == pytest.approx([1.0, 2.0, 0.0, 3.0])
    assert p["mean_pt"] == pytest.approx(1.5)
    # sd of (1, 2, 0, 3) is sqrt(5/3); t(0.975, 3 df) = 3.182
    half = 3.182 * (5 / 3) ** 0.5 / 2
    assert p["ci95_pt"] == pytest.approx([1.5 - half, 1.5 + half])
    same = paired_interval(a, a)
    assert same["mean_pt"] == 0 and same["ci95_pt"] == [0, 0]
    with pytest.raises(ValueError):
        paired_interval({0: 1.0}, {1: 1.0})


def test_digits_splits_are_disjoint_stratified_and_seeded():
    from limited_data import digits_splits

    train, val, test = digits_splits()
    assert (len(train), len(val), len(test)) == (1149, 288, 360)
    rows = torch.cat([train.tensors[0], val.tensors[0], test.tensors[0]]).flatten(1)
    assert len(rows) == 1797 and len(torch.unique(rows, dim=0)) == 1797  # every image once, none twice
    for part in (train, val, test):
        counts = torch.bincount(part.tensors[1], minlength=10).float() / len(part)
        assert counts.min() > 0.08 and counts.max() < 0.12  # stratified: every class near 1/10
    assert torch.equal(digits_splits()[1].tensors[0], val.tensors[0])


def test_val_winner_names_a_tie():
    from limited_data import val_winner

    assert val_winner(0.984375, 0.984375) == "tie"
    assert val_winner(0.99, 0.98) == "admm" and val_winner(0.97, 0.98) == "oneshot"
