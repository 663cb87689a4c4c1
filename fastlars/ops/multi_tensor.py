"""Multi-tensor plumbing for the Triton optimizer kernels, and the norms kernel.

A step launches a fixed number of kernels whatever the number of parameters: every
tensor of a launch is described by one row of a device-side table of pointers and
sizes (as apex's multi_tensor_apply, but read by the kernel), and the work is cut
into CHUNK-element chunks, one program each. Per-tensor norms are reduced without
atomics: each chunk writes its partial sums of squares to its own slot, and a small
finalize launch (one program per tensor) sums a tensor's slots in a fixed order, so
results are bitwise reproducible run to run; the update kernels read one total per
tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..optim import _common
from . import _tables as tb


# Columns of the tensor table (int64). Unused pointers repeat the weight pointer.
(COL_W, COL_P, COL_G, COL_S0, COL_S1, COL_STEP, COL_NUMEL, COL_GROUP, COL_CHUNK0, COL_NCHUNKS,
 COL_FIRST) = (tl.constexpr(i) for i in range(11))
NCOL = 11

# Elements per program and per vector operation. Module attributes so tests can
# shrink them to exercise chunk and block boundaries on small tensors.
CHUNK = 16384
BLOCK = 1024
PARTIAL_BLOCK = 128  # chunk partials reduced per iteration in the finalize kernel

TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
             torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass
class Launch:
    """Everything one kernel launch over a list of tensors needs."""

    table: Tensor        # (n_tensors, NCOL) int64 on the device, one row per tensor (empty ones too)
    chunks: Tensor       # (n_chunks, 2) int64: tensor row, first element
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


def used_on_current_stream(launch: Launch, device: torch.device) -> None:
    """Tell the caching allocator that the launch's tables are used on the current stream.

    Tables are allocated on the stream that built them; a step that reuses them from
    another stream (a side stream, a second training loop) queues kernels that read them
    there. Without record_stream, freeing them (evicted from the cache) would let the
    allocator hand their memory to the building stream while those kernels are still
    queued. Recorded once per stream; not during a capture (a launch a graph reads is
    pinned, never freed).
    """
    stream = torch.cuda.current_stream(device)
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
        capturing = _common.is_capturing(device)
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


def launch_cache(opt) -> LaunchCache:
    """The optimizer's cache of launch tables (created on first use)."""
    cache = getattr(opt, "_launch_cache", None)
    if cache is None:
        cache = opt._launch_cache = LaunchCache()
    return cache


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
        if _common.is_capturing(device):
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
                 acc_dtype: torch.dtype, cache: LaunchCache, validate=None) -> Launch:
    """Tables for one launch, and its group rows (set_group_rows). An empty tensor has a
    table row (its norms are 0) but no chunk.

    ``validate()`` (layout checks) runs when the tables are built, not on a cache hit:
    the key holds every pointer and size, so a hit describes tensors already checked.
    The per-step cost is this key: one tuple of pointers per tensor, nothing else.
    """
    device = params[0].device
    chunk_size = CHUNK
    entries = [(w.data_ptr(), p.data_ptr(), g.data_ptr(), (w if s0 is None else s0).data_ptr(),
                (w if s1 is None else s1).data_ptr(), (w if st is None else st).data_ptr(), p.numel(), gi, int(f))
               for w, p, g, s0, s1, st, gi, f in zip(weights, params, grads, state0, state1, steps, group_of, first)]
    shape = (len(group_rows), len(group_rows[0]))

    def build() -> Launch:
        if validate is not None:
            validate()
        rows, chunk_rows = [], []
        for *pointers, n, group, flag in entries:
            n_chunks = (n + chunk_size - 1) // chunk_size
            rows.append((*pointers, n, group, len(chunk_rows) // 2, n_chunks, flag))
            for c in range(n_chunks):
                chunk_rows += (len(rows) - 1, c * chunk_size)
        table = _on_device(rows, torch.int64, device).reshape(-1, NCOL)
        chunks = _on_device(chunk_rows, torch.int64, device).reshape(-1, 2)
        groups = torch.empty(shape, dtype=torch.float64, device=device)
        write_param = entries[0][0] != entries[0][1]  # master weights: w is not p
        # torch allocations start 16-B aligned, but a view's data_ptr need not be (a gradient
        # in a flat bucket): the hint is given only when every pointer is
        aligned = all(ptr % 16 == 0 for entry in entries for ptr in entry[:6])
        return Launch(table, chunks, len(chunk_rows) // 2, groups, weights[0].dtype, params[0].dtype, acc_dtype,
                      write_param, n_tensors=len(rows), aligned=aligned)

    key = (device, weights[0].dtype, params[0].dtype, acc_dtype, chunk_size, tuple(entries), shape)
    launch = cache.get(key, build, device)
    set_group_rows(launch, group_rows)
    return launch


@triton.jit
def row_pointer(table, row, col, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """A tensor's pointer from its table row; ALIGNED: known 16-B aligned (Launch.aligned),
    which with the unmasked full blocks (load_block) lets the compiler emit 16-B vector loads."""
    ptr = tl.load(table + row * 11 + col).to(tl.pointer_type(dtype))  # 11 = NCOL
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def full_blocks(start, numel, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """(end of this chunk's whole BLOCKs, end of the chunk), as offsets from its start: the
    kernels run the whole blocks unmasked and the tail, if any, masked."""
    n = tl.minimum(numel - start, CHUNK)
    return n - n % BLOCK, n


@triton.jit
def load_block(ptr, idx, numel, MASKED: tl.constexpr):
    """ptr[idx] for one block of contiguous idx: unmasked for a block wholly inside the
    tensor (a mask bounded by a loaded numel would keep every load scalar), masked with 0
    past numel for the tail block."""
    if MASKED:
        x = tl.load(ptr + idx, mask=idx < numel, other=0.0)
    else:
        x = tl.load(ptr + idx)
    return x


@triton.jit
def store_block(ptr, idx, value, numel, MASKED: tl.constexpr):
    """ptr[idx] = value; as load_block."""
    if MASKED:
        tl.store(ptr + idx, value, mask=idx < numel)
    else:
        tl.store(ptr + idx, value)


@triton.jit
def this_chunk(table, chunks, REVERSE: tl.constexpr, CHUNK: tl.constexpr):
    """This program's chunk: (table row, first element, the tensor's numel, its group,
    its first chunk, its chunk count, its first-step flag). The first element is a
    multiple of CHUNK (hinted: block offsets are then known aligned).

    REVERSE (the update kernels): program i takes chunk n-1-i. Programs start roughly in
    id order, so the update begins with the chunks the norms pass read last, which are
    still in L2: that share of the second read of w and g costs no DRAM traffic.
    """
    chunk = tl.program_id(0)
    if REVERSE:
        chunk = tl.num_programs(0) - 1 - chunk
    row = tl.load(chunks + 2 * chunk)
    fields = table + row * 11  # 11 = NCOL
    start = tl.multiple_of(tl.load(chunks + 2 * chunk + 1), CHUNK)
    return (row, start, tl.load(fields + COL_NUMEL), tl.load(fields + COL_GROUP),
            tl.load(fields + COL_CHUNK0), tl.load(fields + COL_NCHUNKS), tl.load(fields + COL_FIRST))


@triton.jit
def sqrt_ieee(x, ACC: tl.constexpr):
    """sqrt(x) rounded as IEEE 754 (and torch) rounds it, subnormals kept.

    tl.sqrt of fp32 compiles to sqrt.approx.ftz.f32: it flushes a subnormal input to 0, so
    a tensor whose sum of squares is below 2^-126 (values around 1e-20) would read as norm
    0 and fall into the zero-norm rule. fp64 is already exact (sqrt.rn.f64). The
    interpreter computes both with numpy: only a GPU shows the difference.
    """
    if ACC == tl.float32:
        y = tl.sqrt_rn(x)
    else:
        y = tl.sqrt(x)
    return y


@triton.jit
def div_ieee(x, y, ACC: tl.constexpr):
    """x / y rounded as IEEE 754: fp32 ``/`` compiles to div.full.f32 (2 ulp, subnormals
    flushed); see sqrt_ieee."""
    if ACC == tl.float32:
        q = tl.div_rn(x, y)
    else:
        q = x / y
    return q


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
def _sumsq_block(w_ptr, g_ptr, idx, numel, acc_w, acc_g, ACC: tl.constexpr, MASKED: tl.constexpr):
    w = load_block(w_ptr, idx, numel, MASKED).to(ACC)
    g = load_block(g_ptr, idx, numel, MASKED).to(ACC)
    return acc_w + w * w, acc_g + g * g


@triton.jit
def sumsq_kernel(table, chunks, partials, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                 ACC: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums of squares of w and g over one chunk: partials[chunk] = (sum w^2, sum g^2).

    Memory traffic: reads w and g once (8 B/element in fp32). This is the first
    pass of the two-pass design; the update kernel reads w and g again.
    """
    chunk = tl.program_id(0)
    row, start, numel, _, _, _, _ = this_chunk(table, chunks, False, CHUNK)
    w_ptr = row_pointer(table, row, 0, W_DTYPE, ALIGNED)
    g_ptr = row_pointer(table, row, 2, G_DTYPE, ALIGNED)
    acc_w = tl.zeros([BLOCK], dtype=ACC)
    acc_g = tl.zeros([BLOCK], dtype=ACC)
    full, n = full_blocks(start, numel, CHUNK, BLOCK)
    for offset in range(0, full, BLOCK):
        acc_w, acc_g = _sumsq_block(w_ptr, g_ptr, start + offset + tl.arange(0, BLOCK), numel, acc_w, acc_g, ACC,
                                    False)
    if full < n:
        acc_w, acc_g = _sumsq_block(w_ptr, g_ptr, start + full + tl.arange(0, BLOCK), numel, acc_w, acc_g, ACC,
                                    True)
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


@triton.jit
def tensor_totals_kernel(table, partials, totals, COLUMNS: tl.constexpr, ACC: tl.constexpr,
                         PARTIAL_BLOCK: tl.constexpr):
    """The finalize of a norms pass, one program per tensor: totals[tensor] = the sums of
    its chunks' partials (first COLUMNS columns of 3; the others 0), in a fixed order.

    Programs of one launch run concurrently with no ordering between them, so a tensor's
    total cannot be formed by the norms pass itself without atomics; a launch of its own
    keeps it deterministic. The update kernels then read one row per tensor instead of
    each of a tensor's programs re-summing all its partials (quadratic in its chunks).
    """
    row = tl.program_id(0)
    fields = table + row * 11  # 11 = NCOL
    chunk0 = tl.load(fields + COL_CHUNK0)
    n_chunks = tl.load(fields + COL_NCHUNKS)
    for column in tl.static_range(3):
        if column < COLUMNS:
            tl.store(totals + 3 * row + column, tensor_sumsq(partials, chunk0, n_chunks, column, ACC, PARTIAL_BLOCK))
        else:
            tl.store(totals + 3 * row + column, 0.0)


def tensor_totals(launch: Launch, partials: Tensor, columns: int) -> Tensor:
    """(n_tensors, 3) per-tensor sums of a norms pass's (n_chunks, 3) partials (see tensor_totals_kernel)."""
    device = launch.table.device
    if not launch.n_chunks:  # only empty tensors: every norm is 0
        return torch.zeros(launch.n_tensors, 3, dtype=launch.acc_dtype, device=device)
    totals = torch.empty(launch.n_tensors, 3, dtype=launch.acc_dtype, device=device)
    with tb.on_device(device):
        tensor_totals_kernel[(launch.n_tensors,)](launch.table, partials, totals, COLUMNS=columns,
                                                  ACC=TL_DTYPES[launch.acc_dtype], PARTIAL_BLOCK=PARTIAL_BLOCK)
    return totals


def launch_sumsq(launch: Launch) -> Tensor:
    """Run sumsq_kernel and its finalize; returns (n_tensors, 3) per-tensor sums of w^2 and
    g^2 (third column 0, where LAMB keeps u^2)."""
    partials = torch.empty(launch.n_chunks, 3, dtype=launch.acc_dtype, device=launch.table.device)
    if launch.n_chunks:
        with tb.on_device(launch.table.device):
            sumsq_kernel[(launch.n_chunks,)](
                launch.table, launch.chunks, partials, W_DTYPE=TL_DTYPES[launch.weights_dtype],
                G_DTYPE=TL_DTYPES[launch.param_dtype], ACC=TL_DTYPES[launch.acc_dtype], ALIGNED=launch.aligned,
                CHUNK=CHUNK, BLOCK=BLOCK)
    return tensor_totals(launch, partials, 2)
