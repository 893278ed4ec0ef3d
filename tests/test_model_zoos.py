"""Models nobody here wrote (timm, torchvision, transformers) through README's public flow.

The flow lives in benchmarks/model_zoos.py (the script that measures README's coverage
figure): plan → ADMM steps → hard prune → masks applied, guard attached → masked step →
compact → export → ONNX Runtime parity against the masked model. A representative subset
runs by default at a small input size; every family at its default input size runs in the
slow suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_zoos  # noqa: E402

# Each exercises something the models we wrote do not: functional batch norm with a fused
# activation (timm BatchNormAct2d), squeeze-excitation gates, deep channel shuffles, 3-D convs (r3d_18
# runs with the slow suite: the fast suite's 3-D convs are the zoo's c3d-small, in test_zoo.py).
FAST = ["timm:mobilenetv3_small_100", "torchvision:shufflenet_v2_x0_5",
        pytest.param("torchvision:r3d_18", marks=pytest.mark.slow)]


def check(name: str, size: int | None, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model, x = model_zoos.build(name, size)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    result = model_zoos.readme_flow(model, x, tmp_path)
    assert result["units"] > 0
    assert result["mac_saving"] >= 0.25, result  # the plan reaches the bulk of the network
    assert result["parity_ok"], result  # pruned.onnx computes what the masked model computes
    assert any((dense[k] != v).any() for k, v in model.state_dict().items())  # it really was trained


@pytest.mark.parametrize("name", FAST)
def test_zoo_model_prunes_compacts_and_exports(name: str, tmp_path: Path) -> None:
    check(name, 64 if not name.endswith("r3d_18") else 32, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"timm:{m}" for m in model_zoos.TIMM_CNNS + model_zoos.TIMM_TRANSFORMERS]
                         + [f"torchvision:{m}" for m in model_zoos.TORCHVISION_CNNS + model_zoos.TORCHVISION_TRANSFORMERS]
                         + [f"hf:{m}" for m in model_zoos.HF_ENCODERS])
def test_every_zoo_family_at_its_default_size(name: str, tmp_path: Path) -> None:
    row = model_zoos.run(name, onnx=True)
    # a model we do not prune gets a one-line reason of ours; never a crash, never a wrong export
    if row["pruned"]:
        assert row["mac_saving"] >= 0.25 and row["parity_ok"], row
        return
    reason = row["reason"]
    assert "\n" not in reason and not reason.startswith("internal error") and "parity" not in reason, row
    # losing a little is no excuse by itself: the plan must say why it left the rest whole
    assert not reason.startswith("loses only") or "left whole: " in reason, row
