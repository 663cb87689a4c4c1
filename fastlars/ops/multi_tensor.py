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

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _tables as tb
from .launch import Launch, LaunchCache  # noqa: F401 (LaunchCache: where the tests reach the drivers' cache)
from .layouts import ChunkColumn, SumColumn, TensorColumn, constexprs


# The tables' columns (layouts.py, the one definition) as constexprs the kernels read by
# name: COL_W ... COL_FIRST and COL_NCOL (TensorColumn), CHUNK_ROW, CHUNK_START, CHUNK_NCOL,
# SUM_W2, SUM_G2, SUM_U2, ..., SUM_NCOL (SumColumn).
globals().update(constexprs(TensorColumn, "COL_"), **constexprs(ChunkColumn, "CHUNK_"),
                 **constexprs(SumColumn, "SUM_"))

# Elements per program and per vector operation. Module attributes so tests can
# shrink them to exercise chunk and block boundaries on small tensors.
CHUNK = 16384
BLOCK = 1024
PARTIAL_BLOCK = 128  # chunk partials reduced per iteration in the finalize kernel
# one_launch's chunk and programs: few and small, so that the items in flight at once touch
# less than L2 holds between a chunk's norm item and its update item (bench/NOTES.md, the
# one-launch byte model); to be tuned on the first GPU run
ONE_LAUNCH_CHUNK = 2048
ONE_LAUNCH_PROGRAMS_PER_SM = 2  # programs of a one-launch kernel (one_launch_grid)

TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
             torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def row_pointer(table, row, col, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """A tensor's pointer from its table row; ALIGNED: known 16-B aligned (Launch.aligned),
    which with the unmasked full blocks (load_block) lets the compiler emit 16-B vector loads."""
    ptr = tl.load(table + row * COL_NCOL + col).to(tl.pointer_type(dtype))
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
def chunk_at(table, chunks, chunk, CHUNK: tl.constexpr):
    """Chunk ``chunk`` of a launch: (table row, first element, the tensor's numel, its group,
    its first chunk, its chunk count, its first-step flag). The first element is a
    multiple of CHUNK (hinted: block offsets are then known aligned)."""
    row = tl.load(chunks + CHUNK_NCOL * chunk + CHUNK_ROW)
    fields = table + row * COL_NCOL
    start = tl.multiple_of(tl.load(chunks + CHUNK_NCOL * chunk + CHUNK_START), CHUNK)
    return (row, start, tl.load(fields + COL_NUMEL), tl.load(fields + COL_GROUP),
            tl.load(fields + COL_CHUNK0), tl.load(fields + COL_NCHUNKS), tl.load(fields + COL_FIRST))


@triton.jit
def this_chunk(table, chunks, REVERSE: tl.constexpr, CHUNK: tl.constexpr):
    """This program's chunk (chunk_at).

    REVERSE (the update kernels): program i takes chunk n-1-i. Programs start roughly in
    id order, so the update begins with the chunks the norms pass read last, which are
    still in L2: that share of the second read of w and g costs no DRAM traffic.
    """
    chunk = tl.program_id(0)
    if REVERSE:
        chunk = tl.num_programs(0) - 1 - chunk
    return chunk_at(table, chunks, chunk, CHUNK)


@triton.jit
def step_ok(ok_ptr, HAS_OK: tl.constexpr):
    """Whether the step happens: the gate's device flag (skip_nonfinite, GradScaler), else True."""
    go = True
    if HAS_OK:
        go = tl.load(ok_ptr) != 0
    return go


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
def sumsq_chunk(table, row, start, numel, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ACC: tl.constexpr,
                ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """(sum w^2, sum g^2) over the chunk of tensor ``row`` that starts at ``start``: its whole
    BLOCKs unmasked (vector loads), the tail masked."""
    w_ptr = row_pointer(table, row, COL_W, W_DTYPE, ALIGNED)
    g_ptr = row_pointer(table, row, COL_G, G_DTYPE, ALIGNED)
    acc_w = tl.zeros([BLOCK], dtype=ACC)
    acc_g = tl.zeros([BLOCK], dtype=ACC)
    full, n = full_blocks(start, numel, CHUNK, BLOCK)
    for offset in range(0, full, BLOCK):
        acc_w, acc_g = _sumsq_block(w_ptr, g_ptr, start + offset + tl.arange(0, BLOCK), numel, acc_w, acc_g, ACC,
                                    False)
    if full < n:
        acc_w, acc_g = _sumsq_block(w_ptr, g_ptr, start + full + tl.arange(0, BLOCK), numel, acc_w, acc_g, ACC,
                                    True)
    return tl.sum(acc_w, axis=0), tl.sum(acc_g, axis=0)


@triton.jit
def sumsq_kernel(table, chunks, partials, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                 ACC: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums of squares of w and g over one chunk: partials[chunk] = (sum w^2, sum g^2).

    Memory traffic: reads w and g once (8 B/element in fp32). This is the first
    pass of the two-pass design; the update kernel reads w and g again.
    """
    chunk = tl.program_id(0)
    row, start, numel, _, _, _, _ = this_chunk(table, chunks, False, CHUNK)
    sum_w, sum_g = sumsq_chunk(table, row, start, numel, W_DTYPE, G_DTYPE, ACC, ALIGNED, CHUNK, BLOCK)
    tl.store(partials + SUM_NCOL * chunk + SUM_W2, sum_w)
    tl.store(partials + SUM_NCOL * chunk + SUM_G2, sum_g)


# the sums columns a norms pass writes (bit masks of SumColumn, for finalize_row): w^2 and
# g^2 (sumsq_kernel); and the third, LAMB's u^2 or the square of the vector a LARS ratio measures
W2_G2_COLUMNS = tl.constexpr((1 << SumColumn.W2) | (1 << SumColumn.G2))
ALL_SUM_COLUMNS = tl.constexpr((1 << SumColumn.W2) | (1 << SumColumn.G2) | (1 << SumColumn.U2))


@triton.jit
def store_sums(partials, chunk, sum_w, sum_g, sum_u):
    """A chunk's partials of a norms pass that writes every column (ALL_SUM_COLUMNS)."""
    out = partials + SUM_NCOL * chunk
    tl.store(out + SUM_W2, sum_w)
    tl.store(out + SUM_G2, sum_g)
    tl.store(out + SUM_U2, sum_u)


@triton.jit
def tensor_sumsq(partials, chunk0, n_chunks, column: tl.constexpr, ACC: tl.constexpr,
                 PARTIAL_BLOCK: tl.constexpr):
    """Sum of one column of a tensor's chunk partials, in a fixed order (deterministic)."""
    acc = tl.zeros([PARTIAL_BLOCK], dtype=ACC)
    for i in range(0, n_chunks, PARTIAL_BLOCK):
        j = i + tl.arange(0, PARTIAL_BLOCK)
        acc += tl.load(partials + SUM_NCOL * (chunk0 + j) + column, mask=j < n_chunks, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def finalize_row(partials, totals, row, chunk0, n_chunks, COLUMNS: tl.constexpr, ACC: tl.constexpr,
                 PARTIAL_BLOCK: tl.constexpr):
    """totals[row] = the sums of a tensor's chunk partials (the columns of the bit mask
    COLUMNS; the others 0), each in a fixed order."""
    for column in tl.static_range(SUM_NCOL):
        if (COLUMNS >> column) & 1:
            tl.store(totals + SUM_NCOL * row + column,
                     tensor_sumsq(partials, chunk0, n_chunks, column, ACC, PARTIAL_BLOCK))
        else:
            tl.store(totals + SUM_NCOL * row + column, 0.0)


@triton.jit
def tensor_totals_kernel(table, partials, totals, COLUMNS: tl.constexpr, ACC: tl.constexpr,
                         PARTIAL_BLOCK: tl.constexpr):
    """The finalize of a norms pass, one program per tensor: totals[tensor] = the sums of
    its chunks' partials (finalize_row).

    Programs of one launch run concurrently with no ordering between them, so a tensor's
    total cannot be formed by the norms pass itself without atomics; a launch of its own
    keeps it deterministic. The update kernels then read one row per tensor instead of
    each of a tensor's programs re-summing all its partials (quadratic in its chunks).
    (The one-launch kernels order their items with tickets instead: next_ticket.)
    """
    row = tl.program_id(0)
    fields = table + row * COL_NCOL
    finalize_row(partials, totals, row, tl.load(fields + COL_CHUNK0), tl.load(fields + COL_NCHUNKS), COLUMNS, ACC,
                 PARTIAL_BLOCK)


# ----------------------------------------------------------------------------
# one launch: norm and update items ordered by tickets (docs/contract.md, "one_launch";
# bench/NOTES.md has the forward-progress argument and the byte model)

@triton.jit
def next_ticket(counters):
    """The launch's next work item (counters[0] counts them out). The ticket, not program_id,
    is the order: every lower ticket is held by a program that has already started, which
    is what lets an update item wait for its tensor's norm items (wait_for_norms)."""
    return tl.atomic_add(counters, 1, sem="relaxed", scope="gpu")


@triton.jit
def item_chunk(item, table, chunks):
    """Work item ``item``: (its chunk, whether it is the chunk's update item). Items are
    ordered per tensor, [norm items of t0][update items of t0][norm items of t1]..., one
    per chunk each: a tensor with chunks c0 .. c0+n-1 owns items 2 c0 .. 2 c0+2n-1, so
    item i belongs to the tensor of chunk i // 2."""
    row = tl.load(chunks + CHUNK_NCOL * (item // 2) + CHUNK_ROW)
    fields = table + row * COL_NCOL
    chunk0 = tl.load(fields + COL_CHUNK0)
    n_chunks = tl.load(fields + COL_NCHUNKS)
    local = item - 2 * chunk0
    is_update = local >= n_chunks
    return chunk0 + tl.where(is_update, local - n_chunks, local), is_update


@triton.jit
def norm_item_done(partials, totals, counters, row, chunk0, n_chunks, COLUMNS: tl.constexpr, ACC: tl.constexpr,
                   PARTIAL_BLOCK: tl.constexpr):
    """After a norm item stored its partials: count it in the tensor's counter (counters[1 +
    row]); the tensor's last norm item sums all its partials in a fixed order
    (finalize_row: deterministic, whichever program is last) and counts once more, which
    releases the update items (the counter then reads n_chunks + 1).

    The barriers order every thread's stores before the one thread's release (and the
    release/acquire pairs order them for other programs); the partials and totals are read
    after an acquire and a barrier, so no stale line from another SM's store is used."""
    tl.debug_barrier()
    done = tl.atomic_add(counters + 1 + row, 1, sem="acq_rel", scope="gpu")
    if done == n_chunks - 1:
        tl.debug_barrier()
        finalize_row(partials, totals, row, chunk0, n_chunks, COLUMNS, ACC, PARTIAL_BLOCK)
        tl.debug_barrier()
        tl.atomic_add(counters + 1 + row, 1, sem="release", scope="gpu")


@triton.jit
def wait_for_norms(counters, row, n_chunks):
    """Spin (acquire) until the tensor's norm items are done and its totals written
    (norm_item_done). They hold lower tickets, so they are running or done: the wait ends."""
    while tl.atomic_add(counters + 1 + row, 0, sem="acquire", scope="gpu") <= n_chunks:
        pass
    tl.debug_barrier()


@triton.jit
def update_goes(counters, totals, row, n_chunks, ok_ptr, HAS_OK: tl.constexpr):
    """An update item's start: wait for its tensor's totals (wait_for_norms), then whether it
    updates: the step goes ahead (step_ok) and the tensor's sums are finite (the gate, taken
    before the launch, could not see them)."""
    wait_for_norms(counters, row, n_chunks)
    go = sums_finite(totals, row)
    if HAS_OK:
        go = go & (tl.load(ok_ptr) != 0)
    return go


@triton.jit
def sums_finite(totals, row):
    """Whether every sum of a tensor's totals row is finite (fp64 compare: no literal inf)."""
    cols = tl.arange(0, 8)
    x = tl.load(totals + SUM_NCOL * row + cols, mask=cols < SUM_NCOL, other=0.0).to(tl.float64)
    return tl.sum(tl.where(tl.abs(x) <= 1.7976931348623157e308, 0, 1), axis=0) == 0


def one_launch_grid(launch: Launch) -> int:
    """Programs of a one-launch kernel: each loops over tickets until the items run out, so
    the programs in flight, and with them the bytes moved between a chunk's two items, are
    bounded by this (ONE_LAUNCH_PROGRAMS_PER_SM per SM), not by the occupancy."""
    items = 2 * launch.n_chunks
    device = launch.table.device
    if device.type != "cuda":  # the interpreter: programs run one after another
        return min(items, 4)
    return min(items, ONE_LAUNCH_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)


def chunk_size(plan) -> int:
    """The chunk of a step's launches: ONE_LAUNCH_CHUNK with one_launch, else CHUNK."""
    return ONE_LAUNCH_CHUNK if plan.one_launch else CHUNK


def item_buffers(launch: Launch) -> tuple[Tensor, Tensor]:
    """A one-launch kernel's chunk partials and its counters (the ticket, then one per
    tensor), zeroed: a memset, captured as such in a CUDA graph."""
    device = launch.table.device
    partials = torch.empty(launch.n_chunks, len(SumColumn), dtype=launch.acc_dtype, device=device)
    return partials, torch.zeros(1 + launch.n_tensors, dtype=torch.int32, device=device)


def tensor_totals(launch: Launch, partials: Tensor, columns: int | tuple[SumColumn, ...]) -> Tensor:
    """(n_tensors, SUM_NCOL) per-tensor sums of a norms pass's (n_chunks, SUM_NCOL) partials
    (see tensor_totals_kernel): of the columns the pass wrote, the first ``columns`` or
    those named; the others are 0 (partials holds garbage there)."""
    mask = (1 << columns) - 1 if isinstance(columns, int) else sum(1 << int(c) for c in columns)
    device = launch.table.device
    if not launch.n_chunks:  # only empty tensors: every norm is 0
        return torch.zeros(launch.n_tensors, len(SumColumn), dtype=launch.acc_dtype, device=device)
    totals = torch.empty(launch.n_tensors, len(SumColumn), dtype=launch.acc_dtype, device=device)
    with tb.on_device(device):
        tensor_totals_kernel[(launch.n_tensors,)](launch.table, partials, totals, COLUMNS=mask,
                                                  ACC=TL_DTYPES[launch.acc_dtype], PARTIAL_BLOCK=PARTIAL_BLOCK)
    return totals


def launch_sumsq(launch: Launch) -> Tensor:
    """Run sumsq_kernel and its finalize; returns (n_tensors, SUM_NCOL) per-tensor sums of w^2 and
    g^2 (column U2 0)."""
    partials = torch.empty(launch.n_chunks, len(SumColumn), dtype=launch.acc_dtype, device=launch.table.device)
    if launch.n_chunks:
        with tb.on_device(launch.table.device):
            sumsq_kernel[(launch.n_chunks,)](
                launch.table, launch.chunks, partials, W_DTYPE=TL_DTYPES[launch.weights_dtype],
                G_DTYPE=TL_DTYPES[launch.param_dtype], ACC=TL_DTYPES[launch.acc_dtype], ALIGNED=launch.aligned,
                CHUNK=CHUNK, BLOCK=BLOCK)
    return tensor_totals(launch, partials, SumColumn.G2 + 1)  # the columns W2 and G2
