"""Multi-tensor plumbing for the Triton optimizer kernels, and the norms kernel.

A step launches a fixed number of kernels whatever the number of parameters: every
tensor of a launch is described by one row of a device-side table of pointers and
sizes (as apex's multi_tensor_apply, but read by the kernel), and the work is cut
into CHUNK-element chunks, one program each. Per-tensor norms are reduced without
atomics: each chunk writes its partial sums of squares to its own slot, and the
update kernel sums a tensor's slots in a fixed order, so results are bitwise
reproducible run to run.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


# Columns of the tensor table (int64). Unused pointers repeat the weight pointer.
(COL_W, COL_P, COL_G, COL_S0, COL_S1, COL_STEP, COL_NUMEL, COL_GROUP, COL_CHUNK0, COL_NCHUNKS,
 COL_FIRST) = (tl.constexpr(i) for i in range(11))
NCOL = 11

# Elements per program and per vector operation. Module attributes so tests can
# shrink them to exercise chunk and block boundaries on small tensors.
CHUNK = 16384
BLOCK = 1024
PARTIAL_BLOCK = 128  # chunk partials reduced per iteration in the update kernels

TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
             torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass
class Launch:
    """Everything one kernel launch over a list of tensors needs."""

    table: Tensor        # (n_tensors, NCOL) int64 on the device
    chunks: Tensor       # (n_chunks, 2) int64: tensor row, first element
    n_chunks: int
    groups: Tensor       # (n_groups, k) float64: per-group hyper-parameters
    weights_dtype: torch.dtype
    param_dtype: torch.dtype
    acc_dtype: torch.dtype
    write_param: bool    # master weights: the kernel writes both master and param


class LaunchCache:
    """The device tables of recent launches, keyed by their whole content (pointers,
    sizes, group hyper-parameters).

    A step whose tensors and hyper-parameters are those of a recent step reuses its
    tables: no host-to-device copy, no allocation. A table built while a CUDA graph is
    being captured is kept for the optimizer's lifetime, because the graph copies it
    from host memory at every replay (the copy is a node of the graph).
    """

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.builds = 0  # tables built, each one copy to the device
        self._recent: OrderedDict = OrderedDict()
        self._captured: list[tuple[Launch, tuple]] = []

    def get(self, key: tuple, build, device: torch.device) -> Launch:
        launch = self._recent.get(key)
        if launch is not None:
            self._recent.move_to_end(key)
            return launch
        launch, host = build()
        self.builds += 1
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self._captured.append((launch, host))
        self._recent[key] = launch
        if len(self._recent) > self.size:
            self._recent.popitem(last=False)
        return launch


def launch_cache(opt) -> LaunchCache:
    """The optimizer's cache of launch tables (created on first use)."""
    cache = getattr(opt, "_launch_cache", None)
    if cache is None:
        cache = opt._launch_cache = LaunchCache()
    return cache


def build_launch(weights: list[Tensor], params: list[Tensor], grads: list[Tensor],
                 state0: list[Tensor | None], state1: list[Tensor | None], steps: list[Tensor | None],
                 group_of: list[int], first: list[bool], group_rows: list[list[float | Tensor]],
                 acc_dtype: torch.dtype, cache: LaunchCache, validate=None) -> Launch:
    """Tables for one launch. Empty tensors are left out (nothing to update, norm 0).

    A group-row entry may be a one-element tensor (a tensor ``lr``): it is copied into
    the device table on the device at every call, so that a captured graph reads the
    tensor's value at replay (a scheduler updating it in place reaches the graph).
    ``validate()`` (layout checks) runs when the tables are built, not on a cache hit:
    the key holds every pointer and size, so a hit describes tensors already checked.
    The per-step cost is this key: one tuple of pointers per tensor, nothing else.
    """
    device = params[0].device
    chunk_size = CHUNK
    entries = [(w.data_ptr(), p.data_ptr(), g.data_ptr(), (w if s0 is None else s0).data_ptr(),
                (w if s1 is None else s1).data_ptr(), (w if st is None else st).data_ptr(), p.numel(), gi, int(f))
               for w, p, g, s0, s1, st, gi, f in zip(weights, params, grads, state0, state1, steps, group_of, first)]
    tensor_entries = [(i, j, x) for i, r in enumerate(group_rows) for j, x in enumerate(r) if isinstance(x, Tensor)]
    host_rows = tuple(tuple(0.0 if isinstance(x, Tensor) else float(x) for x in r) for r in group_rows)

    def build() -> tuple[Launch, tuple]:
        if validate is not None:
            validate()
        rows, chunk_rows = [], []
        for *pointers, n, group, flag in entries:
            if n == 0:
                continue
            n_chunks = (n + chunk_size - 1) // chunk_size
            rows.append((*pointers, n, group, len(chunk_rows), n_chunks, flag))
            chunk_rows.extend([len(rows) - 1, c * chunk_size] for c in range(n_chunks))
        host = (torch.tensor(rows, dtype=torch.int64).reshape(-1, NCOL),
                torch.tensor(chunk_rows, dtype=torch.int64).reshape(-1, 2),
                torch.tensor(host_rows, dtype=torch.float64))
        table, chunks, groups = (t.to(device, non_blocking=True) for t in host)
        write_param = entries[0][0] != entries[0][1]  # master weights: w is not p
        return Launch(table, chunks, len(chunk_rows), groups, weights[0].dtype, params[0].dtype, acc_dtype,
                      write_param), host

    key = (device, weights[0].dtype, params[0].dtype, acc_dtype, chunk_size, tuple(entries), host_rows,
           tuple((i, j) for i, j, _ in tensor_entries))
    launch = cache.get(key, build, device)
    for i, j, value in tensor_entries:
        launch.groups[i, j].copy_(value.reshape(()))
    return launch


@triton.jit
def row_pointer(table, row, col, dtype: tl.constexpr):
    return tl.load(table + row * 11 + col).to(tl.pointer_type(dtype))  # 11 = NCOL


@triton.jit
def this_chunk(table, chunks, REVERSE: tl.constexpr):
    """This program's chunk: (table row, first element, the tensor's numel, its group,
    its first chunk, its chunk count, its first-step flag).

    REVERSE (the update kernels): program i takes chunk n-1-i. Programs start roughly in
    id order, so the update begins with the chunks the norms pass read last, which are
    still in L2: that share of the second read of w and g costs no DRAM traffic.
    """
    chunk = tl.program_id(0)
    if REVERSE:
        chunk = tl.num_programs(0) - 1 - chunk
    row = tl.load(chunks + 2 * chunk)
    fields = table + row * 11  # 11 = NCOL
    return (row, tl.load(chunks + 2 * chunk + 1), tl.load(fields + COL_NUMEL), tl.load(fields + COL_GROUP),
            tl.load(fields + COL_CHUNK0), tl.load(fields + COL_NCHUNKS), tl.load(fields + COL_FIRST))


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE with round-to-nearest-even, as torch's .to(), NaN and Inf kept.

    For bf16 the rounding is done on the bits first: Triton's interpreter truncates
    fp32 -> bf16 (seen with triton 3.8), which would fail the CPU tests and differ
    from the GPU. The pre-rounded value is exact in bf16, so every cast agrees.
    Adding the rounding bias to a NaN's bits would carry its payload into the exponent
    or the sign (a GPU's NaN 0x7FFFFFFF becomes -0.0, 0x7F808000 becomes Inf), so a NaN
    skips it and gets its quiet bit set instead: a truncating cast keeps it a NaN too.
    Infinities and the finite values that round to them come out right from the bits.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        x = tl.where(is_nan, bits | 0x00400000, rounded).to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def sumsq_kernel(table, chunks, partials, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                 ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums of squares of w and g over one chunk: partials[chunk] = (sum w^2, sum g^2).

    Memory traffic: reads w and g once (8 B/element in fp32). This is the first
    pass of the two-pass design; the update kernel reads w and g again.
    """
    chunk = tl.program_id(0)
    row, start, numel, _, _, _, _ = this_chunk(table, chunks, False)
    w_ptr = row_pointer(table, row, 0, W_DTYPE)
    g_ptr = row_pointer(table, row, 2, G_DTYPE)
    acc_w = tl.zeros([BLOCK], dtype=ACC)
    acc_g = tl.zeros([BLOCK], dtype=ACC)
    for offset in range(0, CHUNK, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        mask = idx < numel
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(ACC)
        acc_w += w * w
        acc_g += g * g
    tl.store(partials + 3 * chunk, tl.sum(acc_w, axis=0))
    tl.store(partials + 3 * chunk + 1, tl.sum(acc_g, axis=0))


@triton.jit
def tensor_sumsq(partials, chunk0, n_chunks, column: tl.constexpr, ACC: tl.constexpr,
                 PARTIAL_BLOCK: tl.constexpr):
    """Sum of one column of a tensor's chunk partials, in a fixed order (deterministic)."""
    acc = tl.zeros([PARTIAL_BLOCK], dtype=ACC)
    for i in range(0, n_chunks, PARTIAL_BLOCK):
        j = i + tl.arange(0, PARTIAL_BLOCK)
        acc += tl.load(partials + 3 * (chunk0 + j) + column, mask=j < n_chunks, other=0.0)
    return tl.sum(acc, axis=0)


def launch_sumsq(launch: Launch) -> Tensor:
    """Run sumsq_kernel; returns the (n_chunks, 3) partials (third column left for u)."""
    partials = torch.empty(launch.n_chunks, 3, dtype=launch.acc_dtype, device=launch.table.device)
    if launch.n_chunks:
        sumsq_kernel[(launch.n_chunks,)](
            launch.table, launch.chunks, partials, W_DTYPE=TL_DTYPES[launch.weights_dtype],
            G_DTYPE=TL_DTYPES[launch.param_dtype], ACC=TL_DTYPES[launch.acc_dtype], CHUNK=CHUNK, BLOCK=BLOCK)
    return partials
