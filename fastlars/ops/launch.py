"""Launch tables of the fused optimizer kernels, built once per layout and cached.

A fused step launches a fixed number of kernels whatever the number of parameters:
every tensor of a launch is one row of a device-side table of pointers and sizes
(TensorColumn, layouts.py), and the work is cut into chunks, one program (Triton) or
block (CUDA) each (ChunkColumn). The tables of recent layouts are cached, and the
per-group hyper-parameters are uploaded into a cached launch's group table only when
they change. Imports neither Triton nor the C++ extension: the optimizer owns the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import _tensors
from .layouts import ChunkColumn, TensorColumn, row_of


@dataclass
class Launch:
    """Everything one kernel launch over a list of tensors needs."""

    table: Tensor        # (n_tensors, len(TensorColumn)) int64 on the device, one row per tensor (empty ones too)
    chunks: Tensor       # (n_chunks, len(ChunkColumn)) int64: tensor row, first element
    n_chunks: int
    groups: Tensor       # (n_groups, k) float64 on the device: per-group hyper-parameters (set_group_rows)
    weights_dtype: torch.dtype
    param_dtype: torch.dtype
    acc_dtype: torch.dtype
    write_param: bool    # master weights: the kernel writes both master and param
    n_tensors: int = 0
    aligned: bool = False  # every pointer of the table is 16-B aligned (kernels hint it: vector loads)
    group_values: tuple | None = None  # the float rows `groups` holds (host copy of the last upload)
    streams: set = field(default_factory=set)  # CUDA streams the tables are recorded on (used_on_current_stream)
    last_stream: object = None  # the stream of the last step that used the tables (readers_to_wait_for)


def readers_to_wait_for(launch: Launch, stream):
    """The stream a step on ``stream`` must wait for before it rewrites the launch's group
    table (set_group_rows; at every step for a tensor lr): the stream of the last step that
    used the launch, if another one, whose kernels may still be queued and read the table.
    Records ``stream`` as the last user."""
    previous, launch.last_stream = launch.last_stream, stream
    return previous if previous is not None and previous != stream else None


def used_on_current_stream(launch: Launch, device: torch.device) -> None:
    """Tell the caching allocator that the launch's tables are used on the current stream.

    Tables are allocated on the stream that built them; a step that reuses them from
    another stream (a side stream, a second training loop) queues kernels that read them
    there. Without record_stream, freeing them (evicted from the cache) would let the
    allocator hand their memory to the building stream while those kernels are still
    queued. Recorded once per stream; not during a capture (a launch a graph reads is
    pinned, never freed). A step from another stream than the last one first waits for
    that stream's queued work (readers_to_wait_for; one event, on the device), since it
    rewrites the group table those kernels read.
    """
    stream = torch.cuda.current_stream(device)
    previous = readers_to_wait_for(launch, stream)
    if previous is not None:
        stream.wait_stream(previous)
    if stream not in launch.streams:
        if launch.streams:  # the building stream needs no record: the tables were allocated there
            for t in (launch.table, launch.chunks, launch.groups):
                t.record_stream(stream)
        launch.streams.add(stream)


class LaunchCache:
    """The device tables of recent launches, keyed by their layout (pointers, sizes,
    dtypes, group index and first-step flag of every tensor), not by hyper-parameter
    values: those are uploaded into a launch's group table when they change (see
    set_group_rows), so a float lr that a scheduler changes at every step reuses the tables.

    A step whose tensors are those of a recent step reuses its tables: no table built, no
    allocation. A table used while a CUDA graph is
    being captured is pinned (kept for the optimizer's lifetime): the graph reads its
    device memory at every replay, and an eviction would free it. No table is built
    during a capture (a build copies from host memory): a miss there raises, and the
    drivers build the next step's tables in the state-creating eager step when
    ``capturable=True``, so that one eager step before the capture is enough.
    """

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.builds = 0  # tables built, each one copy to the device
        self._recent: OrderedDict = OrderedDict()
        self.pinned: dict[int, Launch] = {}  # id -> a launch a captured graph reads

    def get(self, key: tuple, build, device: torch.device) -> Launch:
        capturing = _tensors.is_capturing(device)
        launch = self._recent.get(key)
        if launch is not None:
            self._recent.move_to_end(key)
        elif capturing:
            raise RuntimeError("a CUDA graph is being captured but this step needs launch tables that no eager "
                               "step built (a tensor or its layout changed since the last eager step): take an "
                               "eager step with the tensors and values the graph will use, then "
                               "capture; give lr as a tensor to change it between replays")
        else:
            launch = build()
            self.builds += 1
            self._recent[key] = launch
            if len(self._recent) > self.size:
                self._recent.popitem(last=False)
        if capturing:
            self.pinned[id(launch)] = launch
        elif device.type == "cuda":
            used_on_current_stream(launch, device)
        return launch


def _staged(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host table to copy to ``device`` without a host sync: in pinned memory for CUDA (a
    copy from pageable memory blocks), which torch's host allocator keeps until the copy ran."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host table as a new device tensor (see _staged)."""
    return _staged(values, dtype, device).to(device, non_blocking=True)


def set_group_rows(launch: Launch, group_rows: list[list[float | Tensor]]) -> None:
    """Make the launch's device group table hold ``group_rows``.

    Float values are uploaded only when they differ from the last upload (a few
    hundred bytes, asynchronous). A one-element tensor (a tensor ``lr``) is copied on the
    device at every call, so that a captured graph reads the tensor's value at replay (a
    scheduler updating it in place reaches the graph). During a capture nothing is copied
    from the host: a float value changed since the last eager step raises, since the
    graph would replay it unchanged.
    """
    device = launch.groups.device
    values = tuple(tuple(0.0 if isinstance(x, Tensor) else float(x) for x in row) for row in group_rows)
    if values != launch.group_values:
        if _tensors.is_capturing(device):
            raise RuntimeError("a CUDA graph is being captured but a float hyper-parameter changed since the last "
                               "eager step, and a graph replays the values it captured: give lr as a one-element "
                               "tensor on the device to change it between replays, or take an eager step first")
        launch.groups.copy_(_staged(values, torch.float64, device), non_blocking=True)  # straight into the table
        launch.group_values = values
    for i, row in enumerate(group_rows):
        for j, x in enumerate(row):
            if isinstance(x, Tensor):
                launch.groups[i, j].copy_(x.reshape(()))


def build_launch(weights: list[Tensor], params: list[Tensor], grads: list[Tensor],
                 state0: list[Tensor | None], state1: list[Tensor | None], steps: list[Tensor | None],
                 group_of: list[int], first: list[bool], group_rows: list[list[float | Tensor]],
                 acc_dtype: torch.dtype, cache: LaunchCache, chunk_size: int, validate=None) -> Launch:
    """Tables for one launch of ``chunk_size``-element chunks, and its group rows
    (set_group_rows). An empty tensor has a table row (its norms are 0) but no chunk.

    ``validate()`` (layout checks) runs when the tables are built, not on a cache hit:
    the key holds every pointer and size, so a hit describes tensors already checked.
    The per-step cost is this key: one tuple of pointers per tensor, nothing else.
    """
    device = params[0].device
    entries = [(w.data_ptr(), p.data_ptr(), g.data_ptr(), (w if s0 is None else s0).data_ptr(),
                (w if s1 is None else s1).data_ptr(), (w if st is None else st).data_ptr(), p.numel(), gi, int(f))
               for w, p, g, s0, s1, st, gi, f in zip(weights, params, grads, state0, state1, steps, group_of, first)]
    shape = (len(group_rows), len(group_rows[0]))

    def build() -> Launch:
        if validate is not None:
            validate()
        rows, chunk_rows = [], []
        for w, p, g, s0, s1, step, n, group, flag in entries:
            n_chunks = (n + chunk_size - 1) // chunk_size
            rows += row_of(TensorColumn, {TensorColumn.W: w, TensorColumn.P: p, TensorColumn.G: g,
                                          TensorColumn.S0: s0, TensorColumn.S1: s1, TensorColumn.STEP: step,
                                          TensorColumn.NUMEL: n, TensorColumn.GROUP: group,
                                          TensorColumn.CHUNK0: len(chunk_rows) // len(ChunkColumn),
                                          TensorColumn.NCHUNKS: n_chunks, TensorColumn.FIRST: flag})
            for c in range(n_chunks):
                chunk_rows += row_of(ChunkColumn, {ChunkColumn.ROW: len(rows) // len(TensorColumn) - 1,
                                                   ChunkColumn.START: c * chunk_size})
        table = _on_device(rows, torch.int64, device).reshape(-1, len(TensorColumn))
        chunks = _on_device(chunk_rows, torch.int64, device).reshape(-1, len(ChunkColumn))
        groups = torch.empty(shape, dtype=torch.float64, device=device)
        # master weights (fp32 masters of low-precision parameters): the launch's dtypes say
        # it; the first tensor's pointers do not (an empty master and parameter both point at 0)
        write_param = weights[0].dtype != params[0].dtype
        # torch allocations start 16-B aligned, but a view's data_ptr need not be (a gradient
        # in a flat bucket): the hint is given only when every pointer is
        aligned = all(ptr % 16 == 0 for entry in entries for ptr in entry[:6])
        return Launch(table, chunks, chunks.shape[0], groups, weights[0].dtype, params[0].dtype, acc_dtype,
                      write_param, n_tensors=table.shape[0], aligned=aligned)

    key = (device, weights[0].dtype, params[0].dtype, acc_dtype, chunk_size, tuple(entries), shape)
    launch = cache.get(key, build, device)
    set_group_rows(launch, group_rows)
    return launch
