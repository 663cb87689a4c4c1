"""fastlars: fused LARS/LAMB optimizers and Ghost Batch Normalization for large-batch training."""

from ._info import info
from .nn import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, convert_ghost_batchnorm
from .optim import LAMB, LARS, available_backends, make_optimizer, param_groups

__version__ = "0.1.0"

__all__ = ["LARS", "LAMB", "available_backends", "make_optimizer", "param_groups", "GhostBatchNorm", "GhostBatchNorm1d",
           "GhostBatchNorm2d", "convert_ghost_batchnorm", "info", "__version__"]
