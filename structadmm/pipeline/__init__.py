"""The run: config, the stages of a run, training objectives, checkpoints and torchrun.

The method itself (plans, ADMM, masks, surgery) is :mod:`structadmm.prune`; this package strings
its steps into a run that can stop and resume between stages.
"""

from .compress import CompressResult, compact_run, compress, compress_default
from .config import CompressConfig
from .qat import qat_retrain

__all__ = ["CompressConfig", "CompressResult", "compact_run", "compress", "compress_default", "qat_retrain"]
