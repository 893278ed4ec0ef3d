"""The method: sparsity patterns, the channel graph, plans, ADMM, masks, surgery, training."""

from .admm import ADMM, AdmmRound
from .compress import CompressResult, compact_run, compress, compress_default
from .config import CompressConfig
from .graph import ChannelGraph, ChannelGroup, trace
from .masks import MaskGuard, apply_masks
from .plan import Masks, PruningPlan
from .qat import qat_retrain
from .sparsity import Sparsity
from .surgery import compact, compact_with_report

__all__ = [
    "ADMM", "AdmmRound", "ChannelGraph", "ChannelGroup", "CompressConfig", "CompressResult", "MaskGuard",
    "Masks", "PruningPlan", "Sparsity", "apply_masks", "compact", "compact_run", "compact_with_report", "compress",
    "compress_default", "qat_retrain", "trace",
]
