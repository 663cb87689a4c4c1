"""``register_timm``: fastlars flavours in timm's optimizer registry, so that
``timm.optim.create_optimizer_v2(model, "fastlars_lars", ...)`` builds a fastlars
optimizer from timm's own argument names (``trust_coeff``, ``always_adapt``, ...)."""

from __future__ import annotations

import functools

# name -> (compat constructor, timm's registry flags, defaults): timm's lars/larc/nlars/nlarc
# and lamb/lambc/lambw/lambcw, each with the fastlars_ prefix
_FLAVOURS = {
    "lars": ("timm_lars", dict(has_momentum=True), {}),
    "larc": ("timm_lars", dict(has_momentum=True), {"trust_clip": True}),
    "nlars": ("timm_lars", dict(has_momentum=True), {"nesterov": True}),
    "nlarc": ("timm_lars", dict(has_momentum=True), {"nesterov": True, "trust_clip": True}),
    "lamb": ("timm_lamb", dict(has_betas=True), {}),
    "lambc": ("timm_lamb", dict(has_betas=True), {"trust_clip": True}),
    "lambw": ("timm_lamb", dict(has_betas=True), {"decoupled_decay": True}),
    "lambcw": ("timm_lamb", dict(has_betas=True), {"trust_clip": True, "decoupled_decay": True}),
}
PREFIX = "fastlars_"
# timm's factory reads the text after the last "_" of a name as the optimizer (and a
# "lookahead_" before it), so "fastlars_lars" would silently build timm's own Lars. Each
# flavour is also registered under a name without "_", and create_optimizer rewrites
# the prefixed name to it before timm parses the name.
_ALIAS = "fastlars-"


def register_timm(registry=None) -> list[str]:
    """Register ``fastlars_lars``, ``fastlars_larc``, ``fastlars_nlars``, ``fastlars_nlarc``,
    ``fastlars_lamb``, ``fastlars_lambc``, ``fastlars_lambw``, ``fastlars_lambcw`` with timm
    (its default registry unless ``registry`` is given) and return the names. Calling it
    again changes nothing. fastlars keywords such as ``backend=`` pass through
    ``create_optimizer_v2``'s keyword arguments."""
    from timm.optim._optim_factory import OptimInfo, default_registry

    from .peers import timm_lamb, timm_lars

    registry = default_registry if registry is None else registry
    constructors = {"timm_lars": timm_lars, "timm_lamb": timm_lamb}
    names, known = [], set(registry.list_optimizers())
    for flavour, (constructor, flags, defaults) in _FLAVOURS.items():
        for name in (PREFIX + flavour, _ALIAS + flavour):
            if name in known:
                continue
            registry.register(OptimInfo(name=name, opt_class=constructors[constructor],
                                        description=f"fastlars: timm's {flavour} on fused kernels",
                                        defaults=defaults or None, **flags))
        names.append(PREFIX + flavour)
    if not getattr(registry.create_optimizer, "_fastlars", False):
        registry.create_optimizer = _resolving_prefix(registry.create_optimizer)
    return names


def _resolving_prefix(create_optimizer):
    @functools.wraps(create_optimizer)
    def create(model_or_params, opt: str, *args, **kwargs):
        if isinstance(opt, str) and PREFIX in opt.lower():
            opt = opt.lower().replace(PREFIX, _ALIAS)
        return create_optimizer(model_or_params, opt, *args, **kwargs)

    create._fastlars = True
    return create
