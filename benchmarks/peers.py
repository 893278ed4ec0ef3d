"""External peers the benchmarks compare against (benchmark-only dependencies: ``pip install -e ".[bench]"``)."""

from __future__ import annotations

import torch
from torch import nn


def torch_pruning_magnitude(model: nn.Module, example: torch.Tensor, ratio: float, norm: int = 1) -> nn.Module:
    """Torch-Pruning's magnitude pruner (L1 or L2 group importance), one ratio in every layer, one shot.

    The output layer (the model's last Linear) is left whole. Prunes ``model`` in place and returns it.
    """
    import torch_pruning as tp

    output_layer = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(model, example[:1], importance=tp.importance.MagnitudeImportance(p=norm),
                                       pruning_ratio=ratio, ignored_layers=output_layer)
    pruner.step()
    return model
