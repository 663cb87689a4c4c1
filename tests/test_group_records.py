"""Each param group's typed record (fastlars/optim/_hyper.py): decoded once, decoded again
exactly when the user changed the group between steps, and never by reading a device tensor."""

import copy

import pytest
import torch

import fastlars
from fastlars.optim import _hyper
from conftest import backend_params, model_inputs, small_cnn

CPU_BACKENDS = fastlars.backends.usable_on("cpu")


def _records(opt):
    return opt._hypers()


def test_an_unchanged_group_keeps_its_record():
    opt = fastlars.LARS(small_cnn(0).parameters(), lr=0.1, momentum=0.9)
    first = _records(opt)
    assert _records(opt)[0] is first[0]


def test_a_scheduler_lr_makes_a_new_record():
    model = small_cnn(0)
    opt = fastlars.LARS(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = _records(opt)[0]
    model(model_inputs(0, 0)).square().mean().backward()
    opt.step()
    scheduler.step()
    after = _records(opt)[0]
    assert after is not before and after.lr == pytest.approx(0.05) and after.row()[0] == pytest.approx(0.05)


@pytest.mark.parametrize("edit", ["weight_decay", "trust_bounds_in_place", "betas_in_place", "decay_mode",
                                  "trust_ratio", "new_key"])
def test_an_edited_option_makes_a_new_record(edit):
    opt = fastlars.LAMB(small_cnn(0).parameters(), lr=0.1, weight_decay=0.01, adapt_only_decayed=True,
                        trust_bounds=[0.1, 10.0], betas=[0.9, 0.999])
    group = opt.param_groups[0]
    before = _records(opt)[0]
    if edit == "weight_decay":
        group["weight_decay"] = 0.0
        assert not _records(opt)[0].adapt  # adapt_only_decayed follows the decay
    elif edit == "trust_bounds_in_place":
        group["trust_bounds"][1] = 5.0
        assert _records(opt)[0].trust_high == 5.0
    elif edit == "betas_in_place":
        group["betas"][0] = 0.8
        assert _records(opt)[0].beta1 == 0.8
    elif edit == "decay_mode":
        group["decay_mode"] = "l2"
        assert (_records(opt)[0].weight_decay, _records(opt)[0].grad_decay) == (0.0, 0.01)
    elif edit == "trust_ratio":
        group["trust_ratio"] = False
        assert not _records(opt)[0].adapt
    else:
        group["initial_lr"] = 0.1  # as a scheduler adds it: decoded again, the same values
        assert _records(opt)[0] == before
    assert _records(opt)[0] is not before


def test_an_invalid_edit_is_refused_at_the_next_step():
    model = small_cnn(0)
    opt = fastlars.LARS(model.parameters(), lr=0.1, momentum=0.9)
    model(model_inputs(0, 0)).square().mean().backward()
    opt.step()
    opt.param_groups[0]["momentum"] = 1.5
    with pytest.raises(ValueError, match=r"momentum.*param_groups\[0\]"):
        opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    opt.param_groups[0]["lr"] = torch.tensor(-1.0)  # a new tensor is checked (an lr changed in place is not read)
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()


def test_a_tensor_lr_stays_the_tensor():
    """The record holds the tensor (a 0-d view of it): a scheduler's in-place update reaches
    the step without a new record and without a host read."""
    lr = torch.tensor([0.1])
    opt = fastlars.LARS(small_cnn(0).parameters(), lr=lr, momentum=0.9)
    record = _records(opt)[0]
    assert isinstance(record.lr, torch.Tensor) and record.lr.dim() == 0
    assert record.lr.untyped_storage().data_ptr() == lr.untyped_storage().data_ptr()
    lr.mul_(0.5)
    assert record.lr.item() == pytest.approx(0.05)


def test_a_tensor_is_never_read():
    """The change test reads no tensor's value (on CUDA a read would synchronise): a meta
    tensor, which has no value to read, stands in for a CUDA lr."""
    group = {"params": [torch.zeros(1)], "lr": torch.tensor(0.1, device="meta"), "momentum": 0.9}
    key = _hyper.snapshot(group)
    assert key == _hyper.snapshot(group)
    assert key != _hyper.snapshot({**group, "lr": torch.tensor(0.1, device="meta")})  # another tensor


def test_a_loaded_state_dict_makes_new_records():
    opt = fastlars.LARS(small_cnn(0).parameters(), lr=0.1, momentum=0.9)
    before = _records(opt)[0]
    saved = opt.state_dict()
    saved["param_groups"][0]["weight_decay"] = 0.5
    opt.load_state_dict(saved)
    after = _records(opt)[0]
    assert after is not before and after.weight_decay == 0.5


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
@pytest.mark.parametrize("backend", backend_params(CPU_BACKENDS))
def test_steps_with_edits_match_a_decode_at_every_step(name, backend, monkeypatch):
    """A run whose groups are edited between steps (a float lr schedule, options, a list
    edited in place, a tensor lr changed in place) steps bit for bit as a run that decodes
    every group at every step."""
    options = dict(LARS=dict(momentum=0.9, trust_coefficient=0.02, trust_bounds=[0.0, 100.0]),
                   LAMB=dict(max_grad_norm=1.0, trust_bounds=[0.0, 100.0]))[name]
    edits = {1: ("lr", 0.05), 2: ("weight_decay", 0.0), 3: ("bounds", 0.5), 4: ("tensor lr", 0.02),
             5: ("in place", 0.01)}

    def run():
        lr = torch.tensor(0.0)
        model = small_cnn(0)
        opt = getattr(fastlars, name)(fastlars.param_groups(model, weight_decay=1e-3), lr=0.1, backend=backend,
                                      **copy.deepcopy(options))
        for step in range(6):
            kind, value = edits.get(step, (None, None))
            for group in opt.param_groups:
                if kind in ("lr", "weight_decay"):
                    group[kind] = value
                elif kind == "bounds":
                    group["trust_bounds"][0] = value
                elif kind == "tensor lr":
                    group["lr"] = lr.fill_(value)
                elif kind == "in place":
                    lr.fill_(value)
            model(model_inputs(0, step)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    cached = run()
    monkeypatch.setattr(_hyper, "snapshot", lambda group: object())  # never equal: a decode at every step
    decoded = run()
    for p, q in zip(cached, decoded):
        assert torch.equal(p, q)
