"""The op-rule registry keeps its contract (structadmm.graph.registry's docstring): every rule
reads each tensor operand that carries something, and a rule is never replaced by accident."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from archs import ARCHS
from nets import NETS
from random_nets import RandomNet
from structadmm.errors import StructADMMError
from structadmm.graph import audit_rules, rule, trace
from structadmm.graph.registry import RULES

aten = torch.ops.aten


@pytest.mark.parametrize("name", sorted({**NETS, **ARCHS}))
def test_every_rule_reads_every_operand_of_the_test_architectures(name: str) -> None:
    build, shape = {**NETS, **ARCHS}[name]
    torch.manual_seed(0)
    assert audit_rules(build().eval(), torch.randn(shape)) == []


@pytest.mark.parametrize("seed", range(6))
def test_every_rule_reads_every_operand_of_random_graphs(seed: int) -> None:
    model = RandomNet(seed).eval()
    assert audit_rules(model, model.example_input()) == []


def test_a_rule_that_forgets_an_operand_is_found() -> None:
    """The checker itself: a rule for add that reads only its first operand is reported."""

    class Add(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    original = RULES[aten.add]

    @rule(aten.add, replace=True)
    def forgetful(w, node):  # noqa: ANN001 - the rule signature
        return w.chan(node.args[0])

    try:
        found = audit_rules(Add().eval(), torch.randn(1, 3, 4, 4))
    finally:
        rule(aten.add, replace=True)(original)
    assert len(found) == 1 and "'forgetful'" in found[0] and "unread" in found[0]
    assert audit_rules(Add().eval(), torch.randn(1, 3, 4, 4)) == []


def test_a_second_rule_for_an_op_raises_unless_asked_to_replace() -> None:
    original = RULES[operator.getitem]
    with pytest.raises(StructADMMError, match="already has a rule.*replace=True"):
        rule(operator.getitem)(lambda w, node: None)
    assert RULES[operator.getitem] is original


def test_rules_are_registered_before_the_first_trace() -> None:
    """Importing the package registers every rule: a user's rule cannot be overwritten later."""
    assert aten.conv2d in RULES and aten.add in RULES and aten.cat in RULES
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert trace(model, torch.randn(1, 3, 6, 6)).prunable_groups()


def test_every_rule_reads_every_operand_of_the_transformers() -> None:
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from test_transformers import small_bert, small_distilbert, small_swin, small_tv_vit, small_vit

    for build in (small_vit, small_swin, small_tv_vit, small_bert, small_distilbert):
        model, x = build()
        assert audit_rules(model.eval(), x) == [], build.__name__
