"""``fastlars.compat``: the LARS and LAMB implementations people already run, as fastlars
optimizers.

Each constructor takes its peer's own constructor arguments, with the peer's names and
defaults, and returns a :class:`fastlars.LARS` or :class:`fastlars.LAMB` whose updates
equal the peer's rule (docs/contract.md, "Coming from another implementation"); the
fastlars keywords (``backend=``, ``master_weights=``, ``skip_nonfinite=``,
``capturable=``, ``foreach=``, ``fused=``, ``maximize=``) pass through. A peer argument
whose behaviour fastlars does not reproduce raises ``ValueError`` naming it; nothing is
ignored silently.

Where a peer decides per parameter (Barlow Twins' ``ndim == 1`` filters, SimCLR's name
patterns, MLPerf's ``skip_list``), each param group is split into groups of equal
treatment; :func:`load_peer_state_dict` maps the peer's checkpoint onto them.

    opt = fastlars.compat.timm_lars(model.parameters(), lr=5.0, momentum=0.9, weight_decay=1e-4)
    opt = fastlars.compat.apex_fused_lamb(groups, lr=1e-3, weight_decay=0.01)
"""

from .checkpoints import load_peer_state_dict
from .peers import (FASTLARS_OPTIONS, apex_fused_lamb, deepspeed_lamb, larc, mlperf_lars, simclr_lars, ssl_lars,
                    timm_lamb, timm_lars)
from ._timm_registry import register_timm

__all__ = ["timm_lars", "timm_lamb", "larc", "ssl_lars", "simclr_lars", "mlperf_lars", "apex_fused_lamb",
           "deepspeed_lamb", "load_peer_state_dict", "register_timm", "FASTLARS_OPTIONS"]
