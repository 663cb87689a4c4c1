"""The triton backend's step without host reads: a tensor lr that a scheduler updates in
place, launch tables reused from step to step (what lets a CUDA graph capture the step),
and the checks of ``capturable=True``. Runs under the Triton interpreter on the CPU and
compiled on a GPU; the capture and replay itself is in test_fused_gpu.py (load_state_dict's
after a capture is here)."""

import copy
import os

import pytest
import torch

import fastlars
from fastlars.ops import multi_tensor

pytestmark = pytest.mark.skipif("triton" not in fastlars.available_backends(), reason="needs triton")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """CPU tensors under the Triton interpreter, or CUDA tensors with compiled kernels
    (a process has one or the other: the interpreter is chosen when fastlars.ops is imported)."""
    if request.param == "cpu":
        request.getfixturevalue("triton_interpreter")
    elif not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled Triton needs CUDA")
    return torch.device(request.param)

OPTIMIZERS = {"LARS": dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, nesterov=True),
              "LAMB": dict(weight_decay=0.01, max_grad_norm=0.5)}
LR = {"LARS": 0.5, "LAMB": 0.02}


def make_params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (1,), (3, 2, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def groups(params):
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "trust_ratio": False, "weight_decay": 0.0}]


def fill_grads(params, step):
    """New gradient values written into the same .grad tensors (as with zero_grad(set_to_none=False))."""
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        value = torch.randn(p.shape, generator=g).to(p.device)
        if p.grad is None:
            p.grad = value
        else:
            p.grad.copy_(value)


def twin(name, lr, device, **kwargs):
    params = make_params(device)
    opt = getattr(fastlars, name)(groups(params), lr=lr, **{**OPTIMIZERS[name], **kwargs})
    return params, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tensor_lr_updated_in_place_by_a_scheduler(name, device):
    """The lr column of the cached device table is refreshed from the tensor at every step."""
    params, opt = twin(name, torch.tensor(LR[name], device=device), device, backend="triton", capturable=True,
                       skip_nonfinite=True)
    ref_params, ref = twin(name, LR[name], device, backend="reference")
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt, ref)]
    lr_tensor = opt.param_groups[0]["lr"]
    for step in range(4):
        fill_grads(params, step)
        fill_grads(ref_params, step)
        opt.step()
        ref.step()
        for s in schedules:
            s.step()
    assert opt.param_groups[0]["lr"] is lr_tensor  # updated in place, not replaced
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_launch_tables_are_reused_until_something_changes(name, device):
    params, opt = twin(name, LR[name], device, backend="triton")
    ref_params, ref = twin(name, LR[name], device, backend="reference")

    def step(i):
        fill_grads(params, i)
        fill_grads(ref_params, i)
        opt.step()
        ref.step()

    for i in range(2):  # the first step creates state (new tables for the update)
        step(i)
    builds = opt._launch_cache.builds
    for i in range(2, 4):
        step(i)
    assert opt._launch_cache.builds == builds, "same tensors and hyper-parameters: no new table"
    for o in (opt, ref):  # a changed hyper-parameter must reach the kernels
        o.param_groups[0]["weight_decay"] = 0.1
        o.param_groups[0]["lr"] = LR[name] / 2
    step(4)
    assert opt._launch_cache.builds == builds, "tables are keyed on layout: new values, same tables"
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_launch_cache_is_bounded_and_keyed_by_content():
    cache = multi_tensor.LaunchCache(size=2)
    built = []

    def build(tag):
        def make():
            built.append(tag)
            return tag
        return make

    device = torch.device("cpu")
    assert cache.get(("a",), build("A"), device) == "A"
    assert cache.get(("a",), build("A2"), device) == "A"  # hit
    cache.get(("b",), build("B"), device)
    cache.get(("c",), build("C"), device)  # evicts a
    assert cache.get(("a",), build("A3"), device) == "A3"
    assert built == ["A", "B", "C", "A3"] and cache.builds == 4


def test_a_step_from_another_stream_waits_for_the_last_one():
    """The ordering rule of launch tables across CUDA streams (launch.readers_to_wait_for;
    used_on_current_stream makes the wait, see test_a_step_from_another_cuda_stream_...):
    a step rewrites the group table its launch's kernels read, so a step from another
    stream than the last one's waits for that stream, and a step from the same stream
    waits for nothing (the stream orders it). Any values stand for streams here."""
    from fastlars.ops.launch import Launch, readers_to_wait_for

    empty = torch.empty(0, 1)
    launch = Launch(empty, empty, 0, empty, torch.float32, torch.float32, torch.float32, False)
    order = ["default", "default", "side", "side", "default", "third"]
    assert [readers_to_wait_for(launch, s) for s in order] == [None, None, "default", None, "side", "default"]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_from_another_cuda_stream_waits_for_the_last_one(name, backend):
    """A step queued on stream A behind a long kernel, then a step with a new lr on stream B,
    which the caller does not order after A: B rewrites the group table A's kernels read, so
    it waits for A's queued work first. Without that, B's upload and kernels ran while A
    slept and A's step read B's lr. The same gradients for both steps (new gradient tensors
    would be new tables, and rewriting them in place a race of the test's own)."""
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs CUDA and compiled kernels")
    if backend not in fastlars.available_backends():
        pytest.skip(f"needs {backend}")
    device = torch.device("cuda")
    params, opt = twin(name, LR[name], device, backend=backend, skip_nonfinite=True)
    ref_params, ref = twin(name, LR[name], device, backend="reference")
    fill_grads(params, 0)
    fill_grads(ref_params, 0)
    opt.step()  # creates the state and the tables
    ref.step()
    fill_grads(params, 1)
    fill_grads(ref_params, 1)
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    for s in (a, b):
        s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(a):
        torch.cuda._sleep(200_000_000)  # about 0.1 s: B is queued long before A's step runs
        opt.step()
        after_a = [p.detach().clone() for p in params]
    for group in opt.param_groups:
        group["lr"] = LR[name] / 2
    with torch.cuda.stream(b):
        opt.step()
    torch.cuda.synchronize()
    ref.step()
    expected_after_a = [p.detach().clone() for p in ref_params]
    for group in ref.param_groups:
        group["lr"] = LR[name] / 2
    ref.step()
    for got, expected in ((after_a, expected_after_a), (params, ref_params)):
        for p, q in zip(got, expected):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_capturable_needs_triton_and_device_side_skipping(device):
    params = make_params(device)
    with pytest.raises(ValueError, match="capturable=True needs backend='triton'"):
        fastlars.LARS(params, lr=0.1, backend="foreach", capturable=True, skip_nonfinite=True)
    with pytest.raises(ValueError, match="capturable=True needs skip_nonfinite=True"):
        fastlars.LAMB(params, backend="triton", capturable=True)
    with pytest.raises(TypeError, match="capturable must be a bool"):
        fastlars.LAMB(params, backend="triton", capturable="yes", skip_nonfinite=True)


def test_bad_tensor_lr_is_named(device):
    params = make_params(device)
    with pytest.raises(ValueError, match="lr"):
        fastlars.LARS(params, lr=torch.tensor([0.1, 0.2], device=device), backend="triton")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fastlars.LARS(params, lr=torch.tensor(-1.0, device=device), backend="triton")


# ----------------------------------------------------------------------------
# load_state_dict keeps the tensors a captured graph points at

def loaded_twin(name, device):
    """A reference optimizer on twin parameters stepped along another path (gradients of
    steps 10 and 11): its state dict differs from a fresh optimizer's in every value."""
    params, opt = twin(name, LR[name], device, backend="reference")
    for step in (10, 11):
        fill_grads(params, step)
        opt.step()
    return params, opt


def state_pointers(opt, params):
    return {(i, key): t.data_ptr() for i, p in enumerate(params) for key, t in opt.state[p].items()}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_load_state_dict_copies_into_the_state_tensors(name, device):
    """capturable=True: load_state_dict copies the loaded values into the state tensors that
    exist and into the tensor lr (a captured graph points at them), so the launch tables
    keyed on their pointers stay valid, and the steps after it continue the loaded run."""
    lr = torch.tensor(LR[name] * 2, device=device)
    params, opt = twin(name, lr, device, backend="triton", capturable=True, skip_nonfinite=True)
    fill_grads(params, 0)
    opt.step()
    pointers, builds = state_pointers(opt, params), opt._launch_cache.builds
    source_params, source = loaded_twin(name, device)
    opt.load_state_dict(copy.deepcopy(source.state_dict()))
    with torch.no_grad():
        for p, q in zip(params, source_params):
            p.copy_(q)
    assert state_pointers(opt, params) == pointers
    assert all(g["lr"] is lr for g in opt.param_groups) and lr.item() == torch.tensor(LR[name]).item()
    for p, q in zip(params, source_params):
        for key, value in source.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value.to(opt.state[p][key].dtype), rtol=0, atol=0)
    for step in (2, 3):
        fill_grads(params, step)
        fill_grads(source_params, step)
        opt.step()
        source.step()
    assert opt._launch_cache.builds == builds, "the tables built before the load point at the same state"
    for p, q in zip(params, source_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_load_state_dict_after_a_cuda_graph_capture(name, backend):
    """A graph captured before load_state_dict replays on the loaded state: the freed memory
    of a replaced state tensor would be handed to new tensors (canaries here) and written at
    every replay. A state dict that would free a tensor the graph points at is refused."""
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs CUDA and compiled kernels")
    if backend not in fastlars.available_backends():
        pytest.skip(f"needs {backend}")
    device = torch.device("cuda")
    lr = torch.tensor(LR[name], device=device)
    params, opt = twin(name, lr, device, backend=backend, capturable=True, skip_nonfinite=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fill_grads(params, 0)  # the .grad tensors the graph reads
        opt.step()  # the eager step that creates the state
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    shapes = [t.shape for p in params for t in opt.state[p].values()]
    source_params, source = loaded_twin(name, device)
    checkpoint = copy.deepcopy(source.state_dict())
    opt.load_state_dict(checkpoint)
    with torch.cuda.stream(side):  # the allocator reuses a freed block on the stream that allocated it
        canaries = [torch.zeros(s, device=device) for s in shapes for _ in range(4)]
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for p, q in zip(params, source_params):
            p.copy_(q)
    for step in (2, 3, 4):
        fill_grads(params, step)
        fill_grads(source_params, step)
        graph.replay()
        source.step()
    torch.cuda.synchronize()
    assert all(not c.any() for c in canaries), "a replay wrote into memory the load freed"
    for p, q in zip(params, source_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key, value in source.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value.float(), rtol=1e-5, atol=1e-6)
    without = copy.deepcopy(checkpoint)
    del without["state"][0]
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*CUDA graph captured"):
        opt.load_state_dict(without)
    for key, value in before.items():
        assert torch.equal(opt.state[params[0]][key], value)
