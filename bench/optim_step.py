"""Optimizer step time of every row of ROWS, all rows of a workload interleaved in one run.

    python -m bench.optim_step [--device cpu|cuda] [--workloads resnet50 bert_large tiny2000]
                               [--rounds 9] [--min-run-time SECONDS] [--rows REGEX] [--no-reference]
                               [--no-variants]
                               [--plant-slowdown ROW=FACTOR] [--results DIR | --no-save]

Workloads: ResNet-50's parameter shapes (torchvision, no weights: 25.6M parameters in 161
tensors), BERT-Large's (335M in ~390 tensors; on the GPU by default; backend and bf16 rows
only, the variants' state would not fit beside them) and 2,000 tiny tensors (the
launch-bound case).

Rows (ROWS, one line each): torch's fused SGD (momentum) and AdamW, the floor each LARS and
each LAMB row is divided by; every fastlars backend usable on the device; timm's Lars/Lamb;
each LARS/LAMB variant option on the fused backend of the device; bf16 parameters with fp32
master weights; on CUDA each fused step captured in a CUDA graph (torch's too). A row whose
backend is not usable here, or whose options its optimizer does not accept yet, is left
out, saying so.

Timing. Plain ``time.perf_counter`` with interleaving, not torch.utils.benchmark or
pytest-benchmark: both time one statement at a time, so two rows are never measured under
the same conditions, and ``Timer`` runs on one thread unless told otherwise (num_threads=1),
which is how the previous version of this file timed every step and the copy on one of two
cores. Here every row's optimizer is built first (one step creates its state and compiles
its kernels), then R rounds (default 9) visit every row once in a shuffled order; a visit
is a block of steps (at least 3, more for fast rows, so that a block lasts about
min_run_time / R), and its sample is the fastest step of the block on the CPU (the mean of
the block, synchronised at both ends, on CUDA). The floor rows (torch's fused steps) are
visited before, between and after the rows divided by them, and their sample of a round is
their best visit (see measure). Per row: the minimum and the median over rounds; per
fastlars row: its ratio to its floor taken within each round, then the median of those
ratios and their spread; two rows are compared by their samples of the same round
(row_ratio). Ratios hold on any machine; milliseconds do not.

Bandwidth: ``copy_`` (read + write, 8 B per fp32 element) and ``sum`` (read, 4 B) of at
least 64 MiB, timed as two more rows of the same rounds, on the threads the steps use. The
fraction of the floor (docs/contract.md, "The floors") is printed beside each row, but the
headline is the ratio to torch's fused step. The ``sum`` samples also give, per round, the
time of one read of the fp32 gradients (``gradient_read_ms``): the gate of a step that
GradScaler does not decide reads them before anything is written, and the update then moves
at least the bytes of torch's fused step, so floor + that read bounds such a step from
below (bench/check.py prints the bound beside the 1.3x targets).

Parameters and gradients are shared by the rows of a dtype (the values stay finite at these
learning rates); state is per optimizer. The JSON (<results>/optim_step-<device>-<date>.json)
is rewritten after every round, so a run cut by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import inspect
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Timer

import fastlars
from fastlars import backends

RESULTS = Path(__file__).parent / "results"

# docs/contract.md, "The floors": fewest bytes per element a step must move (fp32; bf16
# parameters with fp32 masters move the same: 2 B of w and 2 B of g less, 4 B of master more)
MIN_BYTES_PER_ELEMENT = {"LARS": 20, "LAMB": 28}
LARS_ARGS = dict(lr=0.1, momentum=0.9, weight_decay=5e-5)
LAMB_ARGS = dict(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)  # timm's default clipping
ADAMW_ARGS = dict(lr=1e-3, weight_decay=0.01)  # no clipping: it is work LAMB adds
OPTIMIZER_ARGS = {"LARS": LARS_ARGS, "LAMB": LAMB_ARGS}
ONE_LAUNCH_ARGS = {"LARS": {}, "LAMB": {"max_grad_norm": 0.0}}  # what one_launch=True changes besides
PLANT_ENV = "FASTLARS_BENCH_PLANT"  # ROW=FACTOR[,ROW=FACTOR...], as --plant-slowdown


# ---------------------------------------------------------------------------- the rows

# the options every variant row of the table covers, per family: the test checks the table
# against the optimizers' keyword-only options, so a new option without a row fails it
VARIANT_OPTIONS = {
    "LARS": {"adapt_only_decayed", "ratio_denominator", "zero_norm", "trust_bounds", "lr_in_momentum",
             "trust_clip", "nesterov"},
    "LAMB": {"adapt_only_decayed", "decay_mode", "eps_inside_sqrt", "trust_bounds", "bias_correction_in_lr",
             "grad_norm_eps", "max_grad_norm"},
}


@dataclass(frozen=True)
class Row:
    """One optimizer configuration to time. ``label`` is its name in the tables and the
    baseline's key; ``family`` ("LARS"/"LAMB") picks the floor and the bytes per element."""

    label: str
    family: str
    make: Callable[..., Any]          # (param_groups, **kwargs) -> optimizer
    kwargs: dict[str, Any]
    backend: str | None = None        # the fastlars backend; None for torch's and timm's rows
    dtype: torch.dtype = torch.float32
    graph: bool = False               # the step captured once in a CUDA graph and replayed
    floor: str | None = None          # the label of the row its ratio is taken to; None: a floor row
    variant_of: str | None = None     # the default row an option's target compares with
    needs: str | None = None          # a module the row needs ("timm")
    options: dict[str, Any] = field(default_factory=dict)  # fastlars options beyond OPTIMIZER_ARGS

    @property
    def maths_variant(self) -> bool:
        """A variant of the maths (VARIANT_OPTIONS), not of how the step runs."""
        return bool(self.options) and set(self.options) <= VARIANT_OPTIONS[self.family]


def _floor_label(family: str, graph: bool) -> str:
    return f"{'SGD' if family == 'LARS' else 'AdamW'}[torch,fused{',graph' if graph else ''}]"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _option_text(options: dict[str, Any]) -> str:
    def value(v):
        return f"({','.join(f'{x:g}' for x in v)})" if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else v
    return "".join(f",{k}={value(v)}" for k, v in options.items())


def floor(family: str, *, graph: bool = False) -> Row:
    """torch's fused step of the kind: SGD with momentum for LARS, AdamW for LAMB."""
    make, args = (torch.optim.SGD, LARS_ARGS) if family == "LARS" else (torch.optim.AdamW, ADAMW_ARGS)
    extra = {"capturable": True} if graph and family == "LAMB" else {}  # SGD has no such flag
    return Row(_floor_label(family, graph), family, make, {**args, "fused": True, **extra}, graph=graph)


def fastlars_row(family: str, backend: str, *, dtype: torch.dtype = torch.float32, graph: bool = False,
                 **options: Any) -> Row:
    """fastlars's LARS or LAMB on ``backend`` with ``options`` (a variant of the backend's
    default row when it has any; bf16 rows get master weights, graph rows capturable)."""
    extra = {"master_weights": True} if dtype != torch.float32 else {}
    if graph:
        extra.update(capturable=True, skip_nonfinite=True)
    tags = [backend, *([_dtype_name(dtype)] if dtype != torch.float32 else []),
            *(["graph"] if graph else [])]
    label = f"{family}[{','.join(tags)}{_option_text(options)}]"
    return Row(label, family, functools.partial(getattr(fastlars, family), backend=backend),
               {**OPTIMIZER_ARGS[family], **extra, **options}, backend=backend, dtype=dtype, graph=graph,
               floor=_floor_label(family, graph), options=options,
               variant_of=f"{family}[{backend}]" if options and dtype == torch.float32 and not graph else None)


def _timm(family: str, groups, **kwargs):
    import timm.optim

    return {"LARS": timm.optim.Lars, "LAMB": timm.optim.Lamb}[family](groups, **kwargs)


def timm_row(family: str) -> Row:
    return Row(f"{family}[timm]", family, functools.partial(_timm, family), dict(OPTIMIZER_ARGS[family]),
               floor=_floor_label(family, False), needs="timm")


# The table: one line per row. Rows whose backend is not usable on the device (or, for
# graph rows, on a device other than CUDA) are left out when the run starts.
ROWS: list[Row] = [
    floor("LARS"),
    floor("LAMB"),
    floor("LARS", graph=True),
    floor("LAMB", graph=True),
    # every backend, default options
    fastlars_row("LARS", "reference"),
    fastlars_row("LARS", "foreach"),
    fastlars_row("LARS", "cpu"),
    fastlars_row("LARS", "triton"),
    fastlars_row("LARS", "cuda"),
    timm_row("LARS"),
    fastlars_row("LAMB", "reference"),
    fastlars_row("LAMB", "foreach"),
    fastlars_row("LAMB", "cpu"),
    fastlars_row("LAMB", "triton"),
    fastlars_row("LAMB", "cuda"),
    timm_row("LAMB"),
    # each variant option on each fused backend (docs/contract.md, "LARS variants", "LAMB")
    *(row for backend in ("cpu", "triton", "cuda") for row in (
        fastlars_row("LARS", backend, adapt_only_decayed=True),
        fastlars_row("LARS", backend, ratio_denominator="norm_of_sum"),
        fastlars_row("LARS", backend, ratio_denominator="momentum_update"),
        fastlars_row("LARS", backend, zero_norm="plain_sgd"),
        fastlars_row("LARS", backend, trust_bounds=(0.1, 10.0)),
        fastlars_row("LARS", backend, lr_in_momentum=True),
        fastlars_row("LARS", backend, trust_clip=True),
        fastlars_row("LARS", backend, nesterov=True),
        fastlars_row("LAMB", backend, adapt_only_decayed=True),
        fastlars_row("LAMB", backend, decay_mode="l2"),
        fastlars_row("LAMB", backend, decay_mode="direct"),
        fastlars_row("LAMB", backend, eps_inside_sqrt=True),
        fastlars_row("LAMB", backend, trust_bounds=(0.1, 10.0)),
        fastlars_row("LAMB", backend, bias_correction_in_lr=True),
        fastlars_row("LAMB", backend, grad_norm_eps=1e-6),
        fastlars_row("LAMB", backend, max_grad_norm=0.0),
    )),
    # bf16 parameters, fp32 master weights
    *(fastlars_row(family, backend, dtype=torch.bfloat16) for backend in ("cpu", "triton", "cuda")
      for family in ("LARS", "LAMB")),
    # one step captured in a CUDA graph and replayed (capturable=True)
    *(fastlars_row(family, backend, graph=True) for backend in ("triton", "cuda") for family in ("LARS", "LAMB")),
    # The one-launch Triton step (one_launch=True, off by default), against the two-launch
    # rows of the same run: LARS[triton], and for LAMB LAMB[triton,max_grad_norm=0] (one
    # launch refuses clipping, whose factor needs every norm before any update)
    *(fastlars_row(family, "triton", graph=graph, one_launch=True, **ONE_LAUNCH_ARGS[family])
      for graph in (False, True) for family in ("LARS", "LAMB")),
]

def _accepts(row: Row) -> list[str]:
    """The row's options its constructor does not take (an option not built yet)."""
    make = row.make.func if isinstance(row.make, functools.partial) else row.make
    if not inspect.isclass(make):
        return []
    params = inspect.signature(make).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in row.kwargs if k not in params]


def rows_for(device: torch.device, workload: str, *, reference: bool = True, variants: bool = True,
             select: str | None = None, table: list[Row] | None = None) -> tuple[list[Row], list[str]]:
    """The rows of ``table`` (default ROWS) to time on ``device`` for ``workload``, and a line
    for each row left out, saying why. Floor rows stay whenever a selected row needs them."""
    chosen, left_out = [], []
    usable = set(backends.usable_on(device.type))
    for row in table if table is not None else ROWS:
        why = None
        if row.graph and device.type != "cuda":
            why = "CUDA graphs need a CUDA device"
        elif row.backend is not None and row.backend not in usable:
            why = f"backend {row.backend!r} is not usable on {device.type}"
        elif row.backend == "reference" and not reference:
            why = "the reference backend is left out (--no-reference)"
        elif row.needs and not _importable(row.needs):
            why = f"{row.needs} is not installed"
        elif unknown := _accepts(row):
            why = f"{row.family} does not accept {', '.join(unknown)} (yet)"
        elif row.maths_variant and not variants:
            why = "variants left out (--no-variants)"
        elif row.maths_variant and workload == "bert_large":
            why = "variants are timed on resnet50 and tiny2000 (their state would not fit beside bert_large's)"
        elif select and row.floor is not None and not re.search(select, row.label):
            why = "not selected (--rows)"
        if why:
            left_out.append(f"{row.label}: {why}")
        else:
            chosen.append(row)
    labels = {r.label for r in chosen}
    needed = {r.floor for r in chosen if r.floor is not None}
    kept = [r for r in chosen if r.floor is not None or r.label in needed]
    left_out += [f"{r.label}: no selected row needs it" for r in chosen if r.floor is None and r.label not in needed]
    missing = needed - labels
    if missing:  # a floor left out (e.g. no CUDA graphs): its rows have no ratio
        left_out += [f"{label}: floor row not available; rows dividing by it have no ratio" for label in missing]
    return kept, left_out


@functools.cache
def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------- workloads

def resnet50_shapes() -> list[torch.Size]:
    import torchvision

    with torch.device("meta"):  # shapes only: nothing allocated, no weights downloaded
        model = torchvision.models.resnet50(weights=None)
    return [p.shape for p in model.parameters()]


def tiny_shapes(count: int = 2000) -> list[torch.Size]:
    g = torch.Generator().manual_seed(0)
    return [torch.Size([int(n)]) for n in torch.randint(1, 256, (count,), generator=g)]


def toy_shapes() -> list[torch.Size]:
    """A few small matrices and vectors: both groups of groups_of, for the dry runs and tests."""
    S = torch.Size
    return [S([16, 8]), S([16]), S([8, 8, 3, 3]), S([8]), *tiny_shapes(16)]


def bert_large_shapes(layers: int = 24, hidden: int = 1024, ffn: int = 4096, vocab: int = 30522) -> list[torch.Size]:
    """BERT-Large (uncased) parameter shapes, written out: ~335M parameters."""
    S = torch.Size
    shapes = [S([vocab, hidden]), S([512, hidden]), S([2, hidden]), S([hidden]), S([hidden])]  # embeddings + LN
    for _ in range(layers):
        shapes += [S([hidden, hidden]), S([hidden])] * 4  # Q, K, V, attention output
        shapes += [S([hidden]), S([hidden])]  # LayerNorm
        shapes += [S([ffn, hidden]), S([ffn]), S([hidden, ffn]), S([hidden])]  # feed-forward
        shapes += [S([hidden]), S([hidden])]  # LayerNorm
    shapes += [S([hidden, hidden]), S([hidden])]  # pooler
    return shapes


WORKLOADS = {"resnet50": resnet50_shapes, "bert_large": bert_large_shapes, "tiny2000": tiny_shapes,
             "toy": toy_shapes}  # toy: the device check's dry run and the tests
DEFAULT_WORKLOADS = {"cpu": ["resnet50", "tiny2000"], "cuda": ["resnet50", "bert_large", "tiny2000"]}


def make_params(shapes, device, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """Parameters with gradients (randn, and randn * 1e-2), the same values for every dtype."""
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=g).to(dtype))
        p.grad = (torch.randn(shape, device=device, generator=g) * 1e-2).to(dtype)
        params.append(p)
    return params


def groups_of(params):
    """The usual two groups (docs/contract.md, "Which parameters adapt"): ndim <= 1
    excluded from decay and trust ratio."""
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "trust_ratio": False}]


def copy_bandwidth(device, numel: int, min_run_time: float) -> float:
    """Bytes/s of a device-to-device copy of `numel` fp32 values (read + write), on the
    threads torch uses (Timer's default is one thread)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = Timer("dst.copy_(src)", globals=dict(src=src, dst=dst),
              num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
    return 2 * 4 * numel / t.median


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------- building and timing

def parse_plants(specs: list[str]) -> dict[str, float]:
    """``ROW=FACTOR`` (ROW a label, or ``workload:label``) -> {ROW: FACTOR}; FACTOR > 1
    makes that row's every timed step last FACTOR times as long (a planted slowdown)."""
    plants = {}
    for spec in specs:
        row, sep, factor = spec.rpartition("=")
        try:
            plants[row] = float(factor)
        except ValueError:
            sep = ""
        if not sep or not row or plants[row] < 1:
            raise ValueError(f"--plant-slowdown expects ROW=FACTOR with FACTOR >= 1, got {spec!r}")
    return plants


def plants_from_env() -> list[str]:
    return [s for s in os.environ.get(PLANT_ENV, "").split(",") if s.strip()]


def _planted(step: Callable[[], None], factor: float, sync: Callable[[], None]) -> Callable[[], None]:
    """``step`` followed by a sleep of (factor - 1) times its own duration, inside the timed region."""
    def slowed():
        began = time.perf_counter()
        step()
        sync()
        time.sleep((factor - 1) * (time.perf_counter() - began))
    return slowed


def _sync_for(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def build_step(row: Row, params: list[torch.nn.Parameter], device: torch.device) -> Callable[[], None]:
    """The row's optimizer on ``params`` with one step taken (state created, kernels
    compiled); returns the step to time (a graph replay for graph rows)."""
    kwargs = dict(row.kwargs)
    if row.graph and row.family == "LAMB" or row.graph and row.backend is not None:
        kwargs["lr"] = torch.tensor(kwargs["lr"], device=device)  # replays read it from memory
    opt = row.make(groups_of(params), **kwargs)
    if not row.graph:
        opt.step()
        return opt.step
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):  # state, compiled kernels, cached tables
            opt.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    graph.keep = (opt, kwargs)  # the graph reads their memory at every replay

    return graph.replay


@dataclass
class Timed:
    """A row being timed: its step, block size, one sample per round (seconds) and the
    row it is divided by (its floor), if any."""

    key: str                    # row label, or "copy_" / "sum"
    step: Callable[[], None]
    block: int
    floor: Timed | None = None
    samples: list[float] = field(default_factory=list)
    bytes_per_sample: int = 0   # the bandwidth rows: bytes one call moves


def _block_for(step: Callable[[], None], sync, sample_time: float, min_block: int, max_block: int = 200) -> int:
    began = time.perf_counter()
    step()
    sync()
    once = time.perf_counter() - began
    return max(min_block, min(max_block, int(sample_time / max(once, 1e-7))))


def _sample(timed: Timed, sync, per_step: bool) -> float:
    """One visit: a block of steps; the fastest step (per_step) or the block's mean."""
    if per_step:
        best = float("inf")
        for _ in range(timed.block):
            began = time.perf_counter()
            timed.step()
            best = min(best, time.perf_counter() - began)
        return best
    sync()
    began = time.perf_counter()
    for _ in range(timed.block):
        timed.step()
    sync()
    return (time.perf_counter() - began) / timed.block


def measure(timed: list[Timed], device: torch.device, rounds: int, *, seed: int = 0,
            after_round: Callable[[int], None] | None = None) -> None:
    """R rounds over every row, each in its own shuffled order. The rows of a floor are
    visited in a run with a visit of the floor before, between and after them (floor, row,
    floor, row, ..., floor), and the floor's sample of the round is its fastest visit: a
    visit of a fast step is easily slowed by another process, and the best of many visits
    spread over the round is a steady measure of the round's floor. Appends one sample per
    row per round and calls ``after_round(r)`` after each round. A row that raises is
    dropped (its samples so far kept) and the exceptions re-raised after the rounds."""
    sync, per_step = _sync_for(device), device.type == "cpu"
    order = random.Random(seed)
    failed: dict[int, tuple[Timed, BaseException]] = {}
    floors = [t for t in timed if any(u.floor is t for u in timed)]

    def visit(t: Timed) -> float | None:
        if id(t) in failed:
            return None
        try:
            return _sample(t, sync, per_step)
        except Exception as e:  # report, keep the other rows
            failed[id(t)] = (t, e)
            return None

    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collection inside a timed block (as timeit)
    try:
        for r in range(rounds):
            # a visit list per floor (its rows, shuffled), and the rows that have none
            groups = [[t for t in timed if t.floor is f and id(t) not in failed] for f in floors]
            alone = [[t] for t in timed if (t.floor is None or id(t.floor) in failed) and id(t) not in failed
                     and all(t is not f for f in floors)]
            for g in groups:
                order.shuffle(g)
            visits = groups + alone
            order.shuffle(visits)
            floor_seen: dict[int, list[float]] = {id(f): [] for f in floors}
            for group in visits:
                floor = group[0].floor if group and group[0].floor is not None and id(group[0].floor) not in failed \
                    else None
                if floor:
                    floor_seen[id(floor)].append(visit(floor))
                for t in group:
                    sample = visit(t)
                    if sample is not None:
                        t.samples.append(sample)
                    if floor:
                        floor_seen[id(floor)].append(visit(floor))
            for f in floors:
                seen = [x for x in floor_seen[id(f)] if x is not None]
                if seen:
                    f.samples.append(min(seen))
            if after_round:
                after_round(r)
    finally:
        if gc_was_enabled:
            gc.enable()
    if failed:
        raise RowsFailed(list(failed.values()))


class RowsFailed(Exception):
    def __init__(self, failed):
        self.failed = failed
        super().__init__("; ".join(f"{t.key}: {type(e).__name__}: {e}" for t, e in failed))


# ---------------------------------------------------------------------------- one workload

def per_round_ratios(a: list[float], b: list[float]) -> list[float]:
    """a / b within each round both were sampled in."""
    return [x / y for x, y in zip(a, b)]


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return dict(median=None, min=None, max=None)
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def run_workload(workload: str, device: torch.device, *, rounds: int, min_run_time: float, min_block: int = 3,
                 reference: bool = True, variants: bool = True, select: str | None = None,
                 plants: dict[str, float] | None = None, table: list[Row] | None = None, on_progress: Callable[[dict], None] | None = None,
                 seed: int = 0, bandwidth: bool = True) -> dict:
    """Build and time every row for ``workload``; returns the workload's record (rows,
    bandwidth, auto's picks, errors, what was left out). ``on_progress(record)`` is called
    after every round with the record so far."""
    shapes = WORKLOADS[workload]()
    numel = sum(s.numel() for s in shapes)
    rows, left_out = rows_for(device, workload, reference=reference, variants=variants, select=select, table=table)
    plants = plants or {}
    sync = _sync_for(device)
    params = {dtype: make_params(shapes, device, dtype) for dtype in {r.dtype for r in rows}}
    auto = {}
    for family in ("LARS", "LAMB"):  # what "auto" picks here, for the check against the measured rows
        auto[family] = getattr(fastlars, family)(groups_of(params[torch.float32]), backend="auto").backend
    record = dict(workload=workload, tensors=len(shapes), numel=numel, rounds_done=0, auto=auto,
                  left_out=left_out, errors=[], rows=[], copy_GBps=None, read_GBps=None, gradient_read_ms=[])
    sample_time = min_run_time / max(rounds, 1)

    timed: list[Timed] = []
    began = time.perf_counter()
    for row in rows:
        try:
            step = build_step(row, params[row.dtype], device)
            for key in (row.label, f"{workload}:{row.label}"):
                if key in plants:
                    step = _planted(step, plants[key], sync)
            timed.append(Timed(row.label, step, _block_for(step, sync, sample_time, min_block)))
        except Exception as e:  # report, keep the other rows
            record["errors"].append(f"{row.label}: {type(e).__name__}: {e}")
            print(f"  error, left out: {record['errors'][-1]}", file=sys.stderr)
    steps = len(timed)
    print(f"{workload}: {steps} rows built in {time.perf_counter() - began:.0f} s, timing {rounds} rounds ...", flush=True)
    if bandwidth:  # timed in the same rounds and on the same threads as the steps
        big = max(numel, 2**24 if device.type == "cpu" else 2**26)  # past the last-level cache
        src = torch.randn(big, device=device)
        dst = torch.empty_like(src)
        timed.append(Timed("copy_", lambda: dst.copy_(src), 0, bytes_per_sample=8 * big))
        timed.append(Timed("sum", lambda: src.sum(), 0, bytes_per_sample=4 * big))
        for t in timed[steps:]:
            t.block = _block_for(t.step, sync, sample_time, min_block)
    by_label = {r.label: r for r in rows}
    by_key = {t.key: t for t in timed}
    for t in timed[:steps]:
        t.floor = by_key.get(by_label[t.key].floor)

    def summarise(_round: int | None = None) -> None:
        record["rounds_done"] = max((len(t.samples) for t in timed), default=0)
        for t in timed[steps:]:
            if t.samples and min(t.samples) > 0:
                record[{"copy_": "copy_GBps", "sum": "read_GBps"}[t.key]] = t.bytes_per_sample / min(t.samples) / 1e9
            if t.key == "sum":  # per round: one read of the fp32 gradients at this round's read bandwidth
                record["gradient_read_ms"] = [s * 1e3 * 4 * numel / t.bytes_per_sample for s in t.samples]
        record["rows"] = [_row_record(by_label[t.key], t, numel, record["copy_GBps"], workload,
                                      plants_key(plants, workload, t.key)) for t in timed[:steps] if t.samples]
        if on_progress:
            on_progress(record)

    try:
        measure(timed, device, rounds, seed=seed, after_round=summarise)
    except RowsFailed as failed:
        record["errors"] += [f"{t.key}: {type(e).__name__}: {e}" for t, e in failed.failed]
        summarise()
    return record


def plants_key(plants: dict[str, float], workload: str, label: str) -> float | None:
    return plants.get(f"{workload}:{label}", plants.get(label))


def _row_record(row: Row, t: Timed, numel: int, copy_GBps: float | None, workload: str,
                planted: float | None) -> dict:
    ms = [s * 1e3 for s in t.samples]
    min_bytes = MIN_BYTES_PER_ELEMENT[row.family] * numel
    floor_s = min_bytes / (copy_GBps * 1e9) if copy_GBps else None
    ratio = per_round_ratios(t.samples, t.floor.samples) if t.floor is not None else [1.0] * len(ms)
    return dict(workload=workload, label=row.label, optimizer=row.family, backend=row.backend or
                ("torch" if row.floor is None else "timm"), dtype=_dtype_name(row.dtype),
                graph=row.graph, floor=row.floor, variant_of=row.variant_of, block=t.block,
                ms_per_step=min(ms), ms_median=statistics.median(ms), samples_ms=ms,
                ratio_to_floor=spread(ratio), ratios_to_floor=ratio,
                effective_GBps=min_bytes / min(t.samples) / 1e9,
                fraction_of_floor=floor_s / min(t.samples) if floor_s else None,
                planted_slowdown=planted, status="ok")


# ---------------------------------------------------------------------------- the run

def run(device: torch.device, workloads: list[str], *, rounds: int = 9, min_run_time: float | None = None,
        reference: bool = True, variants: bool = True, select: str | None = None,
        plants: dict[str, float] | None = None, path: Path | None = None, table: list[Row] | None = None, command: str | None = None,
        bandwidth: bool = True) -> dict:
    """Every workload in turn (its rows interleaved); the result is written to ``path``
    (when given) after every round of every workload."""
    if min_run_time is None:
        min_run_time = 0.27 if device.type == "cpu" else 0.2
    result = dict(
        benchmark="optim_step",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=command or " ".join(["python -m bench.optim_step", *sys.argv[1:]]),
        device=device_name(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        triton=_version("triton"),
        fastlars=fastlars.__version__,
        rounds=rounds,
        min_run_time=min_run_time,
        planted_slowdowns=plants or {},
        workloads={},
        rows=[],
        errors=[],
    )

    def progress(record: dict) -> None:
        result["workloads"][record["workload"]] = {k: v for k, v in record.items() if k not in ("rows", "errors")}
        result["rows"] = [r for r in result["rows"] if r["workload"] != record["workload"]] + record["rows"]
        result["errors"] = [e for e in result["errors"] if not e.startswith(f"{record['workload']} ")] + [
            f"{record['workload']} {e}" for e in record["errors"]]
        if path is not None:
            write_json(result, path)

    for workload in workloads:
        began = time.perf_counter()
        run_workload(workload, device, rounds=rounds, min_run_time=min_run_time, reference=reference,
                     variants=variants, select=select, plants=plants, table=table, on_progress=progress, bandwidth=bandwidth)
        print(f"{workload}: {rounds} rounds in {time.perf_counter() - began:.0f} s", flush=True)
    return result


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def results_path(result: dict, stem: str, folder: Path) -> Path:
    """<folder>/<stem>-<date>.json, the date taken from the result."""
    return folder / f"{stem}-{result['date'][:19].replace(':', '')}.json"


def write_json(result: dict, path: Path) -> None:
    """Replace ``path`` whole (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".part")
    scratch.write_text(json.dumps(result, indent=2) + "\n")
    scratch.replace(path)


def write_results(result: dict, stem: str, folder: Path) -> None:
    """<folder>/<stem>-<date>.json, the date taken from the result."""
    path = results_path(result, stem, folder)
    write_json(result, path)
    print(f"wrote {path}")


def row_ratio(result: dict, workload: str, label: str, other: str) -> dict[str, float | None]:
    """Median and spread over rounds of label's time / other's time in the same round."""
    rows = {r["label"]: r for r in result["rows"] if r["workload"] == workload}
    if label not in rows or other not in rows:
        return spread([])
    return spread(per_round_ratios(rows[label]["samples_ms"], rows[other]["samples_ms"]))


def print_table(result: dict) -> None:
    print(f"device: {result['device']}   torch {result['torch']}   {result['date']}   "
          f"{result['rounds']} rounds, rows interleaved")
    for workload, w in result["workloads"].items():
        copy_, read = (f"{w[k]:.1f}" if w[k] else "-" for k in ("copy_GBps", "read_GBps"))
        print(f"\n{workload}: {w['tensors']} tensors, {w['numel'] / 1e6:.2f}M elements, {w['rounds_done']} rounds; "
              f"copy_ {copy_} GB/s, sum {read} GB/s ({result['threads']} threads); auto picks "
              + ", ".join(f"{k} {v}" for k, v in w["auto"].items()))
        header = (f"{'row':<50} {'min ms':>8} {'median':>8} {'vs torch fused (spread)':>26} "
                  f"{'GB/s':>6} {'of floor':>8}")
        print(header)
        print("-" * len(header))
        for r in (r for r in result["rows"] if r["workload"] == workload):
            q = r["ratio_to_floor"]
            ratio = "floor" if r["floor"] is None else "-" if q["median"] is None else \
                f"{q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f})"
            of_floor = f"{r['fraction_of_floor']:.0%}" if r["fraction_of_floor"] else "-"
            planted = f"  [planted x{r['planted_slowdown']:g}]" if r.get("planted_slowdown") else ""
            print(f"{r['label']:<50} {r['ms_per_step']:>8.2f} {r['ms_median']:>8.2f} {ratio:>26} "
                  f"{r['effective_GBps']:>6.1f} {of_floor:>8}{planted}")
        by_reason: dict[str, list[str]] = {}
        for line in w["left_out"]:
            label, _, why = line.partition(": ")
            by_reason.setdefault(why, []).append(label)
        for why, labels in by_reason.items():
            print(f"  left out, {why}: {len(labels)} row{'s' * (len(labels) > 1)} ({', '.join(labels[:3])}"
                  f"{', ...' if len(labels) > 3 else ''})")
    for e in result["errors"]:
        print(f"error: {e}")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options bench.optim_step and bench.check share."""
    parser.add_argument("--rounds", type=int, default=9, help="rounds over all rows (default 9)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of steps per row over all rounds (default 0.27 on the CPU, 0.2 on CUDA); "
                             "a block has at least 3 steps")
    parser.add_argument("--rows", metavar="REGEX", help="time only the rows whose label matches (and their floors)")
    parser.add_argument("--plant-slowdown", action="append", default=[], metavar="ROW=FACTOR",
                        help="make ROW's (a label, or workload:label) every timed step FACTOR times as long, "
                             f"to show that a slowdown is caught; also ${PLANT_ENV}=ROW=FACTOR[,...]")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        help="default: resnet50 tiny2000 on the CPU, all on the GPU")
    parser.add_argument("--no-reference", action="store_true", help="leave out the reference backend's rows")
    parser.add_argument("--no-variants", action="store_true", help="leave out the rows of the LARS/LAMB variant options")
    add_run_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    plants = parse_plants(args.plant_slowdown + plants_from_env())
    partial_result = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    path = None if args.no_save else results_path(partial_result, f"optim_step-{device.type}", args.results)
    if path:
        print(f"writing {path} after every round")
    result = run(device, args.workloads or DEFAULT_WORKLOADS.get(device.type, ["resnet50"]), rounds=args.rounds,
                 min_run_time=args.min_run_time, reference=not args.no_reference,
                 variants=not args.no_variants, select=args.rows, plants=plants,
                 path=path)
    print_table(result)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
