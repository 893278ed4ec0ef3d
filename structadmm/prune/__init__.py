"""The method: sparsity patterns, plans and budgets, ADMM, masks, reconstruction, surgery and lowering.

Everything here works on a model and its channel graph (:mod:`structadmm.graph`) with plain
inputs and outputs; the run that strings the steps together is :mod:`structadmm.pipeline`.
"""

from .admm import ADMM, AdmmRound
from .masks import MaskGuard, apply_masks
from .plan import Masks, PruningPlan
from .reconstruct import Refit, reconstruct
from .sparsity import Sparsity
from .surgery import compact, compact_with_report

__all__ = ["ADMM", "AdmmRound", "MaskGuard", "Masks", "PruningPlan", "Refit", "Sparsity", "apply_masks", "compact",
           "compact_with_report", "reconstruct"]
