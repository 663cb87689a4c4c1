"""fastlars.param_groups: the two usual groups of large-batch training."""

import pytest
import torch

import fastlars
from conftest import small_cnn


def test_two_groups_by_ndim():
    model = small_cnn(0)
    groups = fastlars.param_groups(model, weight_decay=5e-5, lr=0.1)
    adapted, excluded = groups
    assert adapted["weight_decay"] == 5e-5 and adapted["trust_ratio"] is True and adapted["lr"] == 0.1
    assert excluded["weight_decay"] == 0.0 and excluded["trust_ratio"] is False and excluded["lr"] == 0.1
    assert all(p.ndim > 1 for p in adapted["params"])
    assert all(p.ndim <= 1 for p in excluded["params"])
    assert len(adapted["params"]) + len(excluded["params"]) == len(list(model.parameters()))


def test_exclude_hook_and_frozen_parameters():
    model = small_cnn(0)
    model[0].weight.requires_grad_(False)  # frozen: in no group
    groups = fastlars.param_groups(model, 1e-4, exclude=lambda name, p: name.startswith("5."))
    adapted, excluded = groups
    assert not any(p is model[0].weight for g in groups for p in g["params"])
    assert any(p is model[5].weight for p in excluded["params"])
    assert not any(p is model[5].weight for p in adapted["params"])
    assert any(p is model[3].weight for p in adapted["params"])


def test_empty_groups_are_dropped_and_groups_feed_the_optimizers():
    only_bias = torch.nn.Module()
    only_bias.bias = torch.nn.Parameter(torch.zeros(3))
    groups = fastlars.param_groups(only_bias, 1e-4)
    assert len(groups) == 1 and groups[0]["trust_ratio"] is False
    opt = fastlars.LARS(fastlars.param_groups(small_cnn(1), 1e-4), lr=0.1)
    assert [g["trust_ratio"] for g in opt.param_groups] == [True, False]


def test_make_optimizer_builds_the_usual_groups_or_takes_them():
    model = small_cnn(0)
    lars = fastlars.make_optimizer("LARS", model, weight_decay=5e-5, lr=0.1, momentum=0.8, backend="reference")
    assert type(lars) is fastlars.LARS and lars.backend == "reference"
    expected = fastlars.param_groups(model, weight_decay=5e-5)
    assert [(g["weight_decay"], g["trust_ratio"], len(g["params"])) for g in lars.param_groups] == \
        [(g["weight_decay"], g["trust_ratio"], len(g["params"])) for g in expected]
    assert all(g["lr"] == 0.1 and g["momentum"] == 0.8 for g in lars.param_groups)
    groups = [{"params": [model[0].weight]}, {"params": [model[1].bias], "weight_decay": 0.0}]
    lamb = fastlars.make_optimizer("lamb", groups, weight_decay=0.02, lr=0.01)
    assert type(lamb) is fastlars.LAMB and [g["weight_decay"] for g in lamb.param_groups] == [0.02, 0.0]
    with pytest.raises(ValueError, match="optimizer 'adam' is unknown"):
        fastlars.make_optimizer("adam", model, weight_decay=0.0)
    with pytest.raises(ValueError, match="exclude= needs a module"):
        fastlars.make_optimizer("lars", groups, weight_decay=0.0, exclude=lambda name, p: True)
