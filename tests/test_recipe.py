"""The ADMM recipe: learning-rate restarts, the residual tolerance, distillation, the kept ends of a plan,
and the built-in MNIST-1D data with its 1-D CNN."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structadmm import ADMM, PruningPlan
from structadmm.errors import StructADMMError
from structadmm.pipeline import CompressConfig
from structadmm.prune.admm import AdmmSchedule
from structadmm.batches import make_loader
from structadmm.pipeline.train import train_epochs

from nets import chain1d, chain2d


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def _lrs_at_epoch_ends(restart_every: int | None) -> list[float]:
    torch.manual_seed(0)
    seen: list[float] = []
    train_epochs(chain1d(), make_loader(_data(), 16, shuffle=True), 4, lr=0.1, restart_every=restart_every,
                 on_epoch_end=lambda state: seen.append(state["schedule"]["_last_lr"][0]))
    return seen


def test_the_learning_rate_restarts_every_round() -> None:
    # after each whole period the cosine is back at its start; without restarts it decays to 0 over the phase
    assert _lrs_at_epoch_ends(1) == pytest.approx([0.1] * 4)
    assert _lrs_at_epoch_ends(2) == pytest.approx([0.05, 0.1, 0.05, 0.1])
    plain = _lrs_at_epoch_ends(None)
    assert plain == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3, 4)])


def _run_schedule(schedule: AdmmSchedule) -> tuple[ADMM, int]:
    torch.manual_seed(0)
    model = chain1d()
    x, y = _data(32)
    admm = ADMM(model, PruningPlan.uniform(model, x[:2], "filter", 0.5), rho=0.01, rho_growth=1.3)
    epochs = train_epochs(model, make_loader((x, y), 16, shuffle=True), schedule.max_epochs(), lr=0.05,
                          **schedule.train_kwargs(admm))
    return admm, len(epochs)


def test_no_hard_prune_until_the_residual_is_below_the_tolerance() -> None:
    # unreachable tolerance: every extra round is taken, and the outcome says it did not converge
    never = AdmmSchedule(2, 2, tolerance=1e-9, extra_rounds=3)
    admm, epochs = _run_schedule(never)
    assert (admm.round, epochs) == (5, 10)
    assert never.outcome(admm)["extra_rounds"] == 3 and never.outcome(admm)["converged"] is False
    residuals = [r.primal_residual for r in admm.history]
    # a tolerance met after the planned rounds: no extra round
    met = AdmmSchedule(2, 2, tolerance=10.0, extra_rounds=3)
    admm, epochs = _run_schedule(met)
    assert (admm.round, epochs) == (2, 4) and met.outcome(admm)["converged"] is True
    # a tolerance first met in an extra round: it stops at the first round at or below it
    tolerance = min(residuals[2:]) * 1.0000001
    admm, _ = _run_schedule(AdmmSchedule(2, 2, tolerance=tolerance, extra_rounds=3))
    first_below = 1 + next(i for i, r in enumerate(residuals) if i >= 1 and r <= tolerance)
    assert admm.round == first_below and [r.primal_residual for r in admm.history] == residuals[:first_below]


def test_distillation_loss_is_the_weighted_sum() -> None:
    torch.manual_seed(0)
    student, teacher = chain1d(), chain1d()
    x, y = _data(16)
    weight, t = 0.4, 3.0
    s_logits = student(x)  # train mode, as in training: one batch, so BN uses this batch's statistics
    ce = F.cross_entropy(s_logits, y)
    teacher.eval()
    with torch.no_grad():
        t_eval = teacher(x)
    kl = F.kl_div(F.log_softmax(s_logits / t, 1), F.log_softmax(t_eval / t, 1), reduction="batchmean", log_target=True)
    expected = (1 - weight) * ce + weight * t * t * kl
    losses = train_epochs(copy.deepcopy(student), make_loader((x, y), 16, shuffle=False), 1, lr=1e-3,
                          weight_decay=0.0, teacher=teacher, distill=weight, temperature=t)
    assert losses[0] == pytest.approx(float(expected.detach()), rel=1e-5)
    plain = train_epochs(copy.deepcopy(student), make_loader((x, y), 16, shuffle=False), 1, lr=1e-3, weight_decay=0.0)
    assert plain[0] == pytest.approx(float(ce.detach()), rel=1e-5) and plain[0] != pytest.approx(losses[0], rel=1e-3)


def test_keep_ends_leaves_the_first_layer_and_the_classifier_whole() -> None:
    model = chain2d()
    x = torch.randn(2, 3, 8, 8)
    plain = PruningPlan.uniform(model, x, "filter", 0.5)
    kept = PruningPlan.uniform(model, x, "filter", 0.5, keep_ends=True)
    assert {u.name for u in plain.units} - {u.name for u in kept.units} == {"0"}  # the first conv's filters
    masks = kept.masks_for(dict(model.named_parameters()))
    assert "0.weight" not in masks and "12" not in {u.name for u in kept.units}
    # the classifier's rows all stay; it loses input columns only with the hidden layer's filters
    assert bool(masks["12.weight"].any(1).all())
    assert ("12", "classifier, kept whole (keep_ends)") in kept.skipped
    # the same first-layer group named by its reader (channel sparsity) is kept whole too
    channel = PruningPlan.uniform(model, x, "channel", 0.5, keep_ends=True)
    assert all("0.weight" not in u.params() for u in channel.units)
    # shape and irregular sparsity leave both layers' weights alone
    shape = PruningPlan.uniform(model, x, "shape", 0.5, keep_ends=True)
    assert {u.param for u in shape.units} == {"4.weight", "7.weight", "10.weight"}
    # a plan that names the first layer exactly prunes it
    named = PruningPlan.from_dict(model, x, {"*": {"ratio": 0.5}, "0": {"ratio": 0.5}}, keep_ends=True)
    assert "0" in {u.name for u in named.units}


@pytest.mark.parametrize("values, message", [
    ({"distill": 1.0}, "distill = 1.0: must be less than 1"),
    ({"distill_temperature": 0.0}, "distill_temperature = 0.0: must be greater than 0"),
    ({"admm_extra_rounds": -1}, "admm_extra_rounds = -1: must be greater than or equal to 0"),
])
def test_recipe_settings_are_checked(values: dict, message: str) -> None:
    with pytest.raises(StructADMMError, match=message):
        CompressConfig(**values)


@pytest.fixture(scope="module")
def mnist1d():
    pytest.importorskip("mnist1d")
    from structadmm.models.mnist1d import load_mnist1d_splits

    return load_mnist1d_splits()


def test_mnist1d_splits_are_fixed_disjoint_and_large(mnist1d) -> None:
    from structadmm.models.data import load_data
    from structadmm.models.mnist1d import load_mnist1d_splits

    train, val, test = mnist1d
    assert [len(d) for d in (train, val, test)] == [10_000, 5_000, 10_000]
    assert train.tensors[0].shape[1:] == (1, 40) and set(test.tensors[1].unique().tolist()) == set(range(10))
    rows = {tuple(t.tolist()) for d in (train, val, test) for t in d.tensors[0][:, 0, :5]}
    assert len(rows) == 25_000  # no sample in two splits
    again = load_mnist1d_splits()
    assert torch.equal(again[2].tensors[0], test.tensors[0])
    loaded = load_data("mnist1d")
    assert loaded.input_shape == (1, 40) and loaded.num_classes == 10
    assert torch.equal(loaded.val.tensors[0], val.tensors[0])  # held out is validation, never test


def test_mnist1d_cnn_learns_mnist1d(mnist1d) -> None:
    from structadmm.models import get_spec
    from structadmm.pipeline.train import evaluate

    train, val, _ = mnist1d
    torch.manual_seed(0)
    model = get_spec("mnist1d-cnn").build()
    x, y = train.tensors
    train_epochs(model, make_loader((x[:3000], y[:3000]), 128, shuffle=True), 1, lr=0.1)
    assert evaluate(model, make_loader(val, 1000, shuffle=False)) > 0.5  # chance is 0.1


@pytest.mark.slow
def test_the_pipeline_reports_the_admm_outcome_and_distils(digits, tmp_path) -> None:
    from structadmm.models import get_spec
    from structadmm.pipeline import compress

    train, test = digits
    config = CompressConfig(ratio=0.5, dense_epochs=2, admm_rounds=2, admm_epochs=1, retrain_epochs=1, rho=0.5,
                            rho_growth=2.0, admm_tolerance=1e-9, admm_extra_rounds=1, distill=0.5,
                            bench_batches=[4], bench_min_runs=2, bench_min_seconds=0.0)
    torch.manual_seed(0)
    report = compress(get_spec("digits-cnn").build(), train, test, config, out_dir=tmp_path / "run").report
    assert report["admm_outcome"] == {"rounds": 3, "extra_rounds": 1, "primal_residual": report["admm"][-1]["primal_residual"],
                                      "tolerance": 1e-9, "converged": False}
    assert len(report["admm"]) == 3
    left_alone = {row["layer"]: row["reason"] for row in report["left_alone"]}
    assert left_alone["features.0"].startswith("first layer") and left_alone["classifier.3"].startswith("classifier")
    assert "dense_weights" not in json.dumps(report)
