"""External peers the benchmarks compare against (benchmark-only dependencies: ``pip install -e ".[bench]"``)."""

from __future__ import annotations

import torch
from torch import nn

from structadmm.layers import CONVS


def torch_pruning_magnitude(model: nn.Module, example: torch.Tensor, ratio: float, norm: int = 1, *,
                            keep_first: bool = False) -> nn.Module:
    """Torch-Pruning's magnitude pruner (L1 or L2 group importance), one ratio in every layer, one shot.

    The output layer (the model's last Linear) is left whole, and with ``keep_first`` the first
    Conv/Linear layer too (as structadmm's plans do by default). Prunes ``model`` in place and returns it.
    """
    import torch_pruning as tp

    weighted = [m for m in model.modules() if isinstance(m, (*CONVS, nn.Linear))]
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    if keep_first:
        ignored += weighted[:1]
    pruner = tp.pruner.MagnitudePruner(model, example[:1], importance=tp.importance.MagnitudeImportance(p=norm),
                                       pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return model
