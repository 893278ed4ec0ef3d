"""The run is a list of stages (structadmm.pipeline.stages): each names what it needs and gives,
reads its own config keys, and can be used alone; the training objective is one pluggable piece."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nets import chain2d
from structadmm.errors import StructADMMError
from structadmm.pipeline import CompressConfig
from structadmm.pipeline.distributed import DistContext
from structadmm.pipeline.objective import Distillation, Labels, objective_of
from structadmm.pipeline.stages import (
    CONVERTING, PUBLISHING, RUN_WIDE, TRAINING, Carry, Run, compact_stage, plan_stage, run_stages,
)
from structadmm.pipeline.train import train_epochs


@pytest.mark.parametrize("stages", [TRAINING + PUBLISHING, CONVERTING], ids=["compress", "compact_run"])
def test_every_stage_gets_what_it_needs_from_a_stage_before_it(stages: tuple) -> None:
    given: set[str] = set()
    for stage in stages:
        assert set(stage.needs) <= given, (stage.name, set(stage.needs) - given)
        given |= set(stage.gives)
    assert given <= {f.name for f in fields(Carry)}


def test_every_config_key_belongs_to_a_stage_or_to_the_run() -> None:
    read = {key for stage in TRAINING + PUBLISHING for key in stage.keys} | set(RUN_WIDE)
    assert read == set(CompressConfig.model_fields)


def _run(model: nn.Module, tmp_path: Path, **config) -> Run:
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    return Run.start(model, CompressConfig(**config), "net", DistContext(), tmp_path, None, tmp_path, {}, None,
                     (x, y), (x, y), phases=("dense", "admm", "retrain"))


def test_a_stage_runs_alone_on_plain_inputs(tmp_path: Path) -> None:
    """The plan stage and the surgery stage, called alone: a plan of the asked ratio, a model that
    lost those channels and computes what the masked one does."""
    torch.manual_seed(0)
    model = chain2d().eval()
    run = _run(model, tmp_path, ratio=0.5, channel_multiple=1, prune_ends=True)
    carry = plan_stage(run, Carry())
    assert carry.plan.units and all(u.ratio == 0.5 for u in carry.plan.units)
    masks = carry.plan.project(model)
    small = compact_stage(run, Carry(masks=masks)).small
    kept = sum(p.numel() for p in small.parameters())
    assert kept < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(run.example), model(run.example), atol=1e-5, rtol=1e-5)


def test_the_plan_stage_refuses_a_model_with_nothing_to_prune(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))  # one layer: its ends stay whole
    with pytest.raises(StructADMMError, match="nothing in net can be pruned"):
        run_stages((plan_stage,), _run(model, tmp_path))


def test_a_custom_objective_is_what_training_minimises() -> None:
    """An objective that pulls every output to zero, with no labels in the data at all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=16)
    with torch.no_grad():
        before = float(model(torch.randn(64, 4)).pow(2).mean())
    losses = train_epochs(model, data, 20, lr=0.1, weight_decay=0.0,
                          objective=lambda outputs, labels, inputs: outputs.pow(2).mean())
    assert losses[-1] < 0.05 * losses[0] and before > losses[-1]


def test_labels_refuse_data_without_labels_and_distillation_mixes_the_teacher() -> None:
    with pytest.raises(StructADMMError, match="no labels"):
        Labels()(torch.randn(2, 3), None, torch.randn(2, 4))
    torch.manual_seed(0)
    teacher, x = nn.Linear(4, 3).eval(), torch.randn(5, 4)
    student, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    t = 2.0
    kd = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher(x) / t, 1), reduction="batchmean",
                  log_target=True)
    mixed = Distillation(teacher, 0.25, t)(student, y, x)
    torch.testing.assert_close(mixed, 0.75 * F.cross_entropy(student, y) + 0.25 * t * t * kd)
    assert isinstance(objective_of("labels", teacher, distill=0.0), Labels)
    assert isinstance(objective_of("labels", teacher, distill=0.5), Distillation)
    assert isinstance(objective_of("labels", None, distill=0.5), Labels)
