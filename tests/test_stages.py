"""Progressive ADMM stages (admm_stages): each stage prunes within the last, ends at the final ratio's plan,
runs end to end, and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from structadmm import ADMM, PruningPlan, StructADMMError
from structadmm.cli import app
from structadmm.pipeline import CompressConfig, compress
from structadmm.prune.reach import kept_channels
from structadmm.prune.sparsity import keep_count

from nets import two_convs

X = torch.randn(2, 3, 8, 8)


def _nested(inner: dict[str, torch.Tensor], outer: dict[str, torch.Tensor]) -> bool:
    """Every weight ``inner`` keeps, ``outer`` keeps: what ``outer`` pruned, ``inner`` pruned too."""
    return inner.keys() == outer.keys() and all(bool((inner[k] <= outer[k]).all()) for k in inner)


def test_a_plan_within_earlier_masks_prunes_only_among_what_they_kept() -> None:
    model = two_convs().eval()
    plan = PruningPlan.uniform(model, X, "filter", 0.875)
    values = {k: v.detach().clone() for k, v in model.named_parameters() if k in plan.param_names()}
    first = plan.at_ratio(0.5).masks_for(values)
    # the channels the first stage pruned now have by far the largest weights: from scratch they would win
    loud = {k: v * first[k] + (1 - first[k]) * 100.0 for k, v in values.items()}
    second = plan.at_ratio(0.75).masks_for(loud, within=first)
    assert _nested(second, first)
    assert not _nested(plan.at_ratio(0.75).masks_for(loud), first)  # without `within`, the loud ones come back
    final = plan.masks_for(loud, within=second)
    assert _nested(final, second)
    # every stage keeps what its ratio keeps of the whole group; the last, what the final plan keeps
    for masks, ratio in ((first, 0.5), (second, 0.75), (final, 0.875)):
        assert kept_channels(plan, masks) == {"0": keep_count(32, ratio), "3": keep_count(64, ratio)}
    assert kept_channels(plan, final) == kept_channels(plan, plan.masks_for(values))


def test_admm_within_masks_keeps_z_and_the_hard_prune_inside_them() -> None:
    model = two_convs().eval()
    plan = PruningPlan.uniform(model, X, "filter", 0.875)
    first = ADMM(model, plan.at_ratio(0.5)).hard_prune()  # W itself now zero where pruned
    admm = ADMM(model, plan.at_ratio(0.75), within=first)
    assert all(bool((admm.Z[k][first[k] == 0] == 0).all()) for k in first)
    with torch.no_grad():  # even if W moved where it was pruned, the next stage does not take it back
        for name, p in model.named_parameters():
            if name in first:
                p.add_((1 - first[name]) * 50.0)
    assert _nested(admm.hard_prune(), first)


FAST = dict(dense_epochs=1, admm_rounds=2, admm_epochs=1, retrain_epochs=1, admm_stage_retrain_epochs=1,
            batch_size=16, rho=0.5, rho_growth=2.0, channel_multiple=1, prune_ends=True, bench_batches=[4],
            bench_min_runs=2, bench_min_seconds=0.0, bench_isolate=False)


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3


def _compress(tmp_path: Path, name: str, progress=None, resume: bool = False, **settings):
    torch.manual_seed(0)
    config = CompressConfig(**{**FAST, "ratio": 0.875, "admm_stages": [0.5, 0.75], **settings})
    return compress(two_convs(1, 3), _data(32), _data(48, 1), config, out_dir=tmp_path / name, progress=progress,
                    resume=resume)


def test_stages_run_end_to_end_each_within_the_last(tmp_path: Path, monkeypatch) -> None:
    pruned: list[dict[str, torch.Tensor]] = []
    held: list[bool] = []
    hard_prune = ADMM.hard_prune

    def recording(self: ADMM):
        if self.within is not None:  # what earlier stages pruned was held at zero through this stage's training
            held.append(all(bool((p.detach()[self.within[n] == 0] == 0).all()) for n, p in self.params.items()))
        pruned.append(hard_prune(self))
        return pruned[-1]

    monkeypatch.setattr(ADMM, "hard_prune", recording)
    report = _compress(tmp_path, "run").report
    assert len(pruned) == 3 and held == [True, True]
    assert _nested(pruned[1], pruned[0]) and _nested(pruned[2], pruned[1])
    assert [(s["stage"], s["ratio"], s["kept"]) for s in report["admm_stages"]] == [
        (1, 0.5, {"0": 16, "3": 32}), (2, 0.75, {"0": 8, "3": 16})]
    assert all(len(s["admm"]) == 2 and s["retrained_accuracy"] is not None for s in report["admm_stages"])
    # the final kept counts are the final ratio's plan
    assert [(g["group"], g["kept"]) for g in report["groups"]] == [("0", 4), ("3", 8)]
    assert report["pruned"]["weight_sparsity"] > 0 and report["ratio_shortfall"] is None
    assert {"admm_stage1_s", "retrain_stage1_s", "admm_stage2_s", "retrain_stage2_s", "admm_s", "retrain_s"} <= set(
        report["timings"])
    assert "## ADMM stages" in (tmp_path / "run" / "report.md").read_text()


class _StopAt:
    """A stand-in for rich's Progress that raises KeyboardInterrupt at the ``at``-th training step."""

    def __init__(self, at: int):
        self.steps, self.at = 0, at

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, task: int) -> None:
        self.steps += 1
        if self.steps == self.at:
            raise KeyboardInterrupt

    def remove_task(self, task: int) -> None:
        pass


def test_a_staged_run_resumes_inside_a_stage_to_the_uninterrupted_result(tmp_path: Path) -> None:
    full = _compress(tmp_path, "full").report
    # two steps an epoch: dense 1-2, stage 1 ADMM 3-6, its retrain 7-8, stage 2 ADMM 9-12
    with pytest.raises(KeyboardInterrupt):
        _compress(tmp_path, "run", progress=_StopAt(11))
    state = torch.load(tmp_path / ".run.partial" / "checkpoint" / "state.pt", weights_only=True)
    assert (state["phase"], state["epoch"]) == ("admm-2", 1) and state["masks"] is not None
    assert list(state["facts"]["stages"]) == ["1"]
    counter = _StopAt(0)
    resumed = _compress(tmp_path, "run", progress=counter, resume=True).report
    assert counter.steps == 2 + 2 + 4 + 2  # the rest of stage 2 (ADMM, retrain), the final ADMM and retrain
    for key in ("admm_stages", "groups", "admm", "admm_outcome", "mac_ratio"):
        assert resumed[key] == full[key], key
    for key in ("accuracy", "hard_pruned_accuracy", "weight_sparsity"):
        assert resumed["pruned"][key] == full["pruned"][key], key


@pytest.mark.parametrize("settings, message", [
    ({"target_macs": 4.0}, "admm_stages stages the uniform ratio; it cannot be combined with target_macs"),
    ({"plan": "plan.toml"}, "it cannot be combined with plan"),
    ({"sparsity": "filter+shape"}, "admm_stages works with filter and channel sparsity only, not shape"),
    ({"admm_stages": [0.75, 0.5]}, "admm_stages = [0.75, 0.5]: stages must rise strictly"),
    ({"admm_stages": [0.5, 0.9]}, "admm_stages [0.5, 0.9] must rise to ratio 0.875, the last stage"),
])
def test_what_stages_cannot_be_combined_with_is_one_line(settings: dict, message: str) -> None:
    with pytest.raises(StructADMMError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CompressConfig(**{"ratio": 0.875, "admm_stages": [0.5, 0.75], **settings})


def test_the_stages_flag() -> None:
    assert CompressConfig(ratio=0.875, admm_stages=[0.5, 0.875]).stage_ratios() == [0.5, 0.875]
    result = CliRunner().invoke(app, ["run", "--admm-stages", "0.5,x"])
    assert result.exit_code == 2 and "--admm-stages takes ratios separated by commas" in result.output
    result = CliRunner().invoke(app, ["run", "--admm-stages", "0.5,0.8", "--ratio", "0.75"])
    assert result.exit_code == 2 and "admm_stages [0.5, 0.8] must rise to ratio 0.75" in result.output
