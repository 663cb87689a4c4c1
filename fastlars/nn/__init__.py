"""Modules for large-batch training."""

from .ghost_bn import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, convert_ghost_batchnorm, ghost_sizes

__all__ = ["GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "convert_ghost_batchnorm", "ghost_sizes"]
