"""Faults a GPU would hit in the optimizer drivers (issue 14), tested where the CPU allows:
mixed weight dtypes in one launch (master weights and a late-joining parameter), the
CUDA-graph recipe's kernel variants, skip counter and pinned launch tables, the device
guard of every launch, and launch tables keyed on layout only. The capture itself, and
parameters on a second GPU, are in test_fused_gpu.py."""

import pytest
import torch

import fastlars
from conftest import backend_marks, backend_params

AVAILABLE = fastlars.available_backends()
# (backend, device): triton runs on CPU tensors under the interpreter (see conftest)
FUSED = [pytest.param(b, d, marks=[*backend_marks(b), pytest.mark.skipif(
             b not in AVAILABLE or (d == "cuda" and not torch.cuda.is_available()), reason=f"needs {b} on {d}")])
         for b, d in (("triton", "cpu"), ("cpu", "cpu"), ("triton", "cuda"), ("cuda", "cuda"))]
HYPER = {"LARS": dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02),
         "LAMB": dict(lr=0.02, weight_decay=0.01)}


def _late_joiner_run(name, backend, device, late, skip_nonfinite, steps=3):
    """A bf16 model with master weights in which one parameter gets its first gradient at
    step 1 (``late``: first or last of its group, or in a param group added at step 1)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (4, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, torch.bfloat16)) for s in shapes]
    late_param = {"first": params[0], "last": params[-1], "group": params[-1]}[late]
    first_group = params[:-1] if late == "group" else params
    opt = getattr(fastlars, name)([{"params": first_group}], backend=backend, master_weights=True,
                                  skip_nonfinite=skip_nonfinite, **HYPER[name])
    for step in range(steps):
        if late == "group" and step == 1:
            opt.add_param_group({"params": [late_param]})
        for p in params:
            grad = torch.randn(p.shape, generator=g).to(device, torch.bfloat16)
            p.grad = None if p is late_param and step == 0 else grad
        opt.step()
    return params, opt


@pytest.mark.parametrize("skip_nonfinite", [False, True])
@pytest.mark.parametrize("late", ["first", "last", "group"])
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
@pytest.mark.parametrize("backend, device", FUSED)
def test_master_weights_with_a_late_parameter(backend, device, name, late, skip_nonfinite):
    """One launch must read one weight dtype: the late parameter has no fp32 master yet
    while the others do (was FloatingPointError / every step skipped on triton, a dtype
    error on cpu)."""
    params, opt = _late_joiner_run(name, backend, device, late, skip_nonfinite)
    oracle_params, oracle = _late_joiner_run(name, "reference", device, late, skip_nonfinite)
    assert opt.skipped_steps == 0
    for p, q in zip(params, oracle_params):
        torch.testing.assert_close(opt.state[p]["master_param"], oracle.state[q]["master_param"],
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(p, q.to(p.dtype)) or torch.equal(p, opt.state[p]["master_param"].to(p.dtype))


# ---------------------------------------------------------------------------
# fault 2: the CUDA-graph recipe, "one eager step, then capture"

CAPTURABLE = {"LARS": dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02),
              "LAMB": dict(weight_decay=0.01, max_grad_norm=0.5)}


def _capturable_run(name, dtype=torch.bfloat16):
    """A capturable triton optimizer (bf16 parameters with masters, a tensor lr) and a
    function writing new gradient values in place (the graph's static gradients)."""
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in ((7, 5), (13,), (3, 2, 3))]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = getattr(fastlars, name)(params, lr=torch.tensor(0.05), backend="triton", capturable=True,
                                  skip_nonfinite=True, master_weights=dtype != torch.float32,
                                  **CAPTURABLE[name])

    def new_grads(nan=False):
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=g))
        if nan:
            params[1].grad[3] = float("nan")

    return params, opt, new_grads


class _Recorder:
    """Stands in for a Triton kernel and records the variant of each launch (argument
    dtypes and constexprs: what Triton compiles one binary for) before running it."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            dtypes = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else repr(a) for a in args)
            self.log.append((self.name, dtypes, tuple(sorted((k, str(v)) for k, v in kwargs.items()))))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _record_launches(monkeypatch) -> list:
    from fastlars.ops import lamb_step, lars_step, multi_tensor

    log = []
    for module in (lars_step, lamb_step, multi_tensor):
        for attr in dir(module):
            if attr.endswith("_kernel"):
                monkeypatch.setattr(module, attr, _Recorder(getattr(module, attr), attr, log))
    return log


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_state_creating_step_launches_every_later_variant(name, monkeypatch):
    """capturable=True: the first (state-creating) eager step launches the kernel variants
    of every later step, so none is first compiled (a module load) during a capture."""
    log = _record_launches(monkeypatch)
    params, opt, new_grads = _capturable_run(name)
    new_grads()
    opt.step()
    first = set(log)
    log.clear()
    for nan in (False, True):
        new_grads(nan)
        opt.step()
    assert log and set(log) <= first, sorted(set(log) - first)


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_one_eager_step_then_a_capture(name, monkeypatch):
    """The documented recipe on the CPU, with the capture stood in by is_capturing: after
    exactly one eager step nothing is built during the capture, the launches it uses are
    pinned, and the skip counter is a device tensor that the captured step adds to."""
    from fastlars import _tensors

    params, opt, new_grads = _capturable_run(name)
    new_grads()
    opt.step()
    counter = opt._skipped_steps
    assert isinstance(counter, torch.Tensor) and int(counter) == 0
    cache = opt._launch_cache
    builds = cache.builds
    monkeypatch.setattr(_tensors, "is_capturing", lambda device: True)
    new_grads(nan=True)
    opt.step()  # "captured": a table build here would raise
    assert cache.builds == builds
    recent = [id(launch) for launch in cache._recent.values()]
    assert cache.pinned and all(key in recent for key in cache.pinned)
    assert opt._skipped_steps is counter and int(counter) == 1
    for p in params:  # skipped on the device: masters untouched since the eager step
        assert torch.equal(p, opt.state[p]["master_param"].to(p.dtype))


def test_cache_hit_during_a_capture_is_pinned(monkeypatch):
    """A graph reads the tables of every launch it captured, hits included: they must
    outlive their eviction from the cache of recent launches."""
    from fastlars.ops import multi_tensor
    from fastlars import _tensors

    cache = multi_tensor.LaunchCache(size=2)
    device = torch.device("cpu")
    hit = cache.get(("a",), lambda: ["tables a"], device)
    monkeypatch.setattr(_tensors, "is_capturing", lambda device: True)
    assert cache.get(("a",), lambda: ["rebuilt"], device) is hit
    with pytest.raises(RuntimeError, match="no eager step built"):
        cache.get(("b",), lambda: ["tables b"], device)  # nothing is built during a capture
    monkeypatch.setattr(_tensors, "is_capturing", lambda device: False)
    for key in "bcd":  # more distinct keys than the cache holds: "a" is evicted
        cache.get((key,), lambda: [key], device)
    assert ("a",) not in cache._recent
    assert any(launch is hit for launch in cache.pinned.values())


@pytest.mark.parametrize("backend", backend_params(["cpu", "foreach", "triton"]))
def test_skip_counter_is_a_device_tensor_after_the_first_step(backend):
    if backend not in AVAILABLE:
        pytest.skip(f"needs {backend}")
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = fastlars.LARS([p], lr=0.1, backend=backend, skip_nonfinite=True)
    p.grad = torch.randn(4, 3)
    opt.step()
    counter = opt._skipped_steps
    assert isinstance(counter, torch.Tensor) and counter.device == p.device and opt.skipped_steps == 0
    p.grad[0, 0] = float("inf")
    opt.step()
    assert opt._skipped_steps is counter and opt.skipped_steps == 1


# ---------------------------------------------------------------------------
# fault 3: every launch runs on its tensors' device

def _record_guards(monkeypatch) -> list:
    """Replaces tb.on_device by a recorder: the returned list holds the devices of the
    guards entered and not yet left, innermost last."""
    import contextlib

    from fastlars.ops import _tables

    current = []

    @contextlib.contextmanager
    def recording_guard(device):
        current.append(device)
        yield
        current.pop()

    monkeypatch.setattr(_tables, "on_device", recording_guard)
    return current


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_every_launch_is_guarded_with_its_tensors_device(name, monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': each launch must run
    inside tb.on_device(<its parameters' device>), and get its device scalars there."""
    current = _record_guards(monkeypatch)
    log = _record_launches(monkeypatch)
    launches = []
    monkeypatch.setattr(_Recorder, "__getitem__", lambda self, grid: lambda *args, **kwargs: launches.append(
        (list(current), {a.device for a in args if isinstance(a, torch.Tensor)})))
    params, opt, new_grads = _capturable_run(name)
    for _ in range(2):
        new_grads()
        opt.step()
    assert launches and not log
    for guards, devices in launches:
        assert guards == [params[0].device] and devices == {params[0].device}


# ---------------------------------------------------------------------------
# fault 6: host work per step

@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_a_float_lr_schedule_reuses_the_launch_tables(name, monkeypatch):
    """Tables are keyed on layout: a float lr changed at every step (a scheduler) builds no
    table and uploads only the group rows, whose new values reach the kernels. Small
    chunks: tensors span several, so the per-tensor finalize adds partials too."""
    from fastlars.ops import multi_tensor

    monkeypatch.setattr(multi_tensor, "CHUNK", 16)
    monkeypatch.setattr(multi_tensor, "BLOCK", 8)
    monkeypatch.setattr(multi_tensor, "PARTIAL_BLOCK", 2)
    runs = []
    for backend in ("triton", "reference"):
        g = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((9, 7), (37,), (1,), (0,))]
        opt = getattr(fastlars, name)(params, backend=backend, **HYPER[name])
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        for step in range(4):
            for p in params:  # new values in the same gradient tensors: same pointers
                value = torch.randn(p.shape, generator=g)
                p.grad = value if p.grad is None else p.grad.copy_(value)
            opt.step()
            schedule.step()
            if backend == "triton" and step == 1:
                builds = opt._launch_cache.builds
        runs.append((params, opt))
    (params, opt), (oracle_params, _) = runs
    assert opt._launch_cache.builds == builds
    for p, q in zip(params, oracle_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# issue 17: faults found by reading the code against Triton 3.6 and torch 2.11

@pytest.mark.usefixtures("triton_interpreter")
def test_ghost_bn_launches_are_guarded_with_the_input_device(monkeypatch):
    """Ghost BN's Triton forward and backward launch inside tb.on_device(<the input's
    device>), as the optimizer's launches do: Triton launches on the current CUDA device."""
    from fastlars.ops import ghost_bn

    current, launches = _record_guards(monkeypatch), []
    for attr in ("ghost_bn_forward_kernel", "ghost_bn_backward_kernel"):
        recorder = _Recorder(getattr(ghost_bn, attr), attr, [])
        monkeypatch.setattr(ghost_bn, attr, recorder)
    monkeypatch.setattr(_Recorder, "__getitem__", lambda self, grid: lambda *args, **kwargs: (
        launches.append((self.name, list(current))), self.kernel[grid](*args, **kwargs)))
    module = fastlars.GhostBatchNorm2d(3, virtual_batch_size=2, backend="triton")
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    module(x).square().sum().backward()
    assert [name for name, _ in launches] == ["ghost_bn_forward_kernel", "ghost_bn_backward_kernel"]
    assert all(guards == [x.device] for _, guards in launches)


def test_a_tensor_lr_on_another_device_is_read_on_the_host():
    """tb.group_rows keeps a tensor lr on the launch's device (copied on the device by the
    drivers, no sync) and reads one on another device as a float: a CPU tensor lr with CUDA
    parameters would otherwise be copied from pageable memory at every step (a sync, and a
    copy a CUDA graph refuses). No CUDA tensor is needed to check the rule."""
    from fastlars.ops import _tables as tb
    from fastlars.ops.layouts import LarsColumn
    from fastlars.optim._hyper import lars_hyper

    lr = torch.tensor(0.25)
    defaults = fastlars.LARS([torch.nn.Parameter(torch.ones(1))]).defaults  # every option the row reads
    group = dict(defaults, lr=lr, weight_decay=0.0, trust_coefficient=0.001, eps=0.0, trust_clip=False,
                 trust_ratio=True, momentum=0.9, dampening=0.0, nesterov=False)
    [on_cpu] = tb.group_rows([lars_hyper(group).row()], torch.device("cpu"))
    [on_cuda] = tb.group_rows([lars_hyper(group).row()], torch.device("cuda", 0))
    assert on_cpu[LarsColumn.LR] is lr
    assert type(on_cuda[LarsColumn.LR]) is float and on_cuda[LarsColumn.LR] == 0.25


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_cpp_backend_copies_a_tensor_lr_into_its_table(name):
    """backend='cpu' (its host group table; 'cuda' reads the cached launch tables, see
    test_fused_gpu.py) with a tensor lr that a scheduler changes in place: the kernels see
    each new value, as with the same lr given as floats."""
    if "cpu" not in AVAILABLE:
        pytest.skip("the C++ extension is not available")
    runs = []
    for as_tensor in (True, False):
        g = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((6, 4), (9,), (1,))]
        lr = torch.tensor(HYPER[name]["lr"]) if as_tensor else HYPER[name]["lr"]
        opt = getattr(fastlars, name)(params, backend="cpu", **{**HYPER[name], "lr": lr})
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            if as_tensor:
                lr.mul_(0.5)
            else:
                opt.param_groups[0]["lr"] *= 0.5
        runs.append(params)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def test_launch_tables_are_recorded_on_each_stream_that_uses_them(monkeypatch):
    """A cached launch reused from another CUDA stream has its tables recorded on that
    stream (record_stream), once per stream, so that evicting them cannot hand their memory
    to the building stream under queued kernels; nothing is recorded for the building
    stream, nor during a capture. Streams and tensors are stand-ins (no CUDA here)."""
    from types import SimpleNamespace

    from fastlars.ops import multi_tensor as mt
    from fastlars import _tensors

    recorded, waits = [], []

    class Stream(str):  # a stand-in stream: its name, and the waits it queues
        def wait_stream(self, other):
            waits.append((str(self), str(other)))

    table = lambda name: SimpleNamespace(record_stream=lambda stream: recorded.append((name, str(stream))))
    launch = mt.Launch(table("table"), table("chunks"), 1, table("groups"), torch.float32, torch.float32,
                       torch.float32, False)
    stream = [Stream("default")]
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream[0])
    monkeypatch.setattr(_tensors, "is_capturing", lambda device: capturing[0])
    cache, cuda = mt.LaunchCache(), torch.device("cuda", 0)
    assert cache.get("key", lambda: launch, cuda) is launch  # built on "default"
    cache.get("key", lambda: None, cuda)
    assert recorded == [] and waits == []
    stream[0] = Stream("side")
    cache.get("key", lambda: None, cuda)
    cache.get("key", lambda: None, cuda)
    assert sorted(recorded) == [("chunks", "side"), ("groups", "side"), ("table", "side")]
    assert waits == [("side", "default")]  # once: then "side" was the last to use the tables
    stream[0], capturing[0] = Stream("capture"), True
    cache.get("key", lambda: None, cuda)
    assert len(recorded) == 3 and id(launch) in cache.pinned
