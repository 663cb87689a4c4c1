"""Large-batch optimizers: LARS and LAMB with reference and multi-tensor backends."""

from ..backends import available_backends
from ._groups import param_groups
from .factory import make_optimizer
from .lamb import LAMB
from .lars import LARS

__all__ = ["LARS", "LAMB", "available_backends", "make_optimizer", "param_groups"]
