"""Compile every Triton kernel ahead of time for real GPUs (sm_80, sm_90), without a GPU.

    python tests/triton_aot.py [ARCH ...] [--ptxas] [--census] [--warps N ...]

Run as a script in a process *without* TRITON_INTERPRET (the interpreter is chosen when
the kernels are decorated); test_triton_compile.py does that. Catches what the
interpreter tolerates but the compiler rejects (types, constexpr branches, casts).
--ptxas prints each variant's ptxas resource report (registers, spill bytes, stack) from
Triton's own ptxas; --census each variant's PTX instruction census; every ALIGNED optimizer
variant must hold a 16-B vector load (ld.global.v4.b32, fp64 ld.global.v2.b64); --warps compiles the Ghost BN kernels at those warp counts instead of
the launcher's (fastlars.ops.ghost_bn.num_warps_for): the figures in bench/NOTES.md.
"""

import argparse
import itertools
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastlars.ops import ghost_bn, lamb_step, lars_step, multi_tensor

F32, BF16, F64 = tl.float32, tl.bfloat16, tl.float64
# (weights dtype, param dtype, acc dtype, write_param): fp32, bf16 without and with master weights, fp64
DTYPES = [(F32, F32, F32, False), (BF16, BF16, F32, False), (F32, BF16, F32, True), (F64, F64, F64, False)]
NAMES = {F32: "fp32", BF16: "bf16", F64: "fp64"}
# the kernels' OPTIONS (lars_step.LarsOption, lamb_step.LambOption): the default groups' set,
# and every option at once (the most code: every per-group select)
LARS_DEFAULT = int(lars_step.LarsOption.MOMENTUM)
LARS_NORM_OF_SUM = int(lars_step.LarsOption.NORM_OF_SUM | lars_step.LarsOption.MOMENTUM)
LARS_ALL = int(sum(lars_step.LarsOption))
LAMB_DEFAULT = int(lamb_step.LambOption.EPS_OUTSIDE_SQRT)
LAMB_ALL = int(sum(lamb_step.LambOption))


def pointer(dtype) -> str:
    return "*" + NAMES[dtype]


def variants(ghost_bn_warps=None):
    """(kernel, signature, constexprs, options) of every variant the launchers use."""
    chunk = dict(CHUNK=16384, BLOCK=1024)
    for w, p, acc, write_p in DTYPES:
        common = {"table": "*i64", "chunks": "*i64", "partials": pointer(acc), "totals": pointer(acc),
                  "groups": "*fp64"}
        for aligned in (False, True):
            yield (multi_tensor.sumsq_kernel, {**common}, dict(W_DTYPE=w, G_DTYPE=p, ACC=acc, ALIGNED=aligned, **chunk),
                   {})
            # the variants' sums without and with the momentum buffer (and a grad scale with it)
            for options in (LARS_NORM_OF_SUM, LARS_ALL):
                yield (lars_step.lars_sums_kernel, {**common, "inv_scale_ptr": "*fp32"},
                       dict(W_DTYPE=w, G_DTYPE=p, ACC=acc, HAS_SCALE=options == LARS_ALL, OPTIONS=options,
                            ALIGNED=aligned, **chunk), {})
        if (w, p) == (acc, acc):  # one finalize per accumulator dtype and column mask (LARS; LAMB, LARS variants)
            for columns in (0b11, 0b111):
                yield (multi_tensor.tensor_totals_kernel, {"table": "*i64", "partials": pointer(acc),
                                                           "totals": pointer(acc)},
                       dict(COLUMNS=columns, ACC=acc, PARTIAL_BLOCK=128), {})
        for has_ok, has_scale, has_clip in itertools.product([False, True], repeat=3):
            flags = dict(W_DTYPE=w, P_DTYPE=p, ACC=acc, WRITE_P=write_p, HAS_SCALE=has_scale, **chunk)
            # the default groups' lean body everywhere; every option's code where some flags are set
            for options in (LARS_DEFAULT, LARS_ALL) if has_clip else (LARS_DEFAULT,):
                yield (lars_step.lars_update_kernel, {**common, "ok_ptr": "*i32", "inv_scale_ptr": "*fp32"},
                       dict(flags, HAS_OK=has_ok, OPTIONS=options, ALIGNED=has_clip), {})  # both ALIGNED values
            lamb_options = (LAMB_DEFAULT, LAMB_ALL) if has_clip and has_scale else (LAMB_DEFAULT,)
            for options in lamb_options:
                yield (lamb_step.lamb_norms_kernel, {**common, "global_norm_ptr": "*fp64", "inv_scale_ptr": "*fp32"},
                       dict(W_DTYPE=w, P_DTYPE=p, ACC=acc, HAS_CLIP=has_clip, HAS_SCALE=has_scale, OPTIONS=options,
                            ALIGNED=has_ok, **chunk), {})
                yield (lamb_step.lamb_update_kernel, {**common, "global_norm_ptr": "*fp64", "inv_scale_ptr": "*fp32",
                                                      "ok_ptr": "*i32"},
                       dict(flags, HAS_CLIP=has_clip, HAS_OK=has_ok, OPTIONS=options, ALIGNED=has_ok != has_scale), {})
        # one_launch: the default groups aligned, every option (and every flag) unaligned
        one_launch = {**common, "counters": "*i32", "ok_ptr": "*i32", "inv_scale_ptr": "*fp32", "n_items": "i32"}
        for (lars_options, lamb_options), flag in (((LARS_DEFAULT, LAMB_DEFAULT), False), ((LARS_ALL, LAMB_ALL), True)):
            flags = dict(W_DTYPE=w, P_DTYPE=p, ACC=acc, WRITE_P=write_p, HAS_OK=True, HAS_SCALE=flag,
                         ALIGNED=not flag, PARTIAL_BLOCK=128, CHUNK=multi_tensor.ONE_LAUNCH_CHUNK, BLOCK=1024)
            yield lars_step.lars_one_launch_kernel, one_launch, dict(flags, OPTIONS=lars_options), {}
            yield lamb_step.lamb_one_launch_kernel, one_launch, dict(flags, OPTIONS=lamb_options), {}
    ints = {name: "i32" for name in ("N", "C", "S", "vbs", "n_ghosts")}
    # int32 strides: Triton's type for values below 2^31, where products used to wrap
    strides = lambda *names: {f"s{n}_{d}": "i32" for n in names for d in "ncs"}
    for x, acc, one_pass, affine in itertools.product([F32, BF16], [F32], [True, False], [True, False]):
        block = ghost_bn.ONE_PASS_MAX if one_pass else ghost_bn.TILE
        for warps in ghost_bn_warps or [ghost_bn.num_warps_for(block)]:
            options = {"num_warps": warps}
            yield (ghost_bn.ghost_bn_forward_kernel,
                   {"x_ptr": pointer(x), "y_ptr": pointer(x), "w_ptr": "*fp32", "b_ptr": "*fp32", "mean_ptr": "*fp32",
                    "var_ptr": "*fp32", **ints, "eps": "fp32", **strides("x", "y")},
                   dict(HAS_WEIGHT=affine, HAS_BIAS=affine, ACC=acc, ONE_PASS=one_pass, BLOCK=block), options)
            yield (ghost_bn.ghost_bn_backward_kernel,
                   {"x_ptr": pointer(x), "dy_ptr": pointer(x), "dx_ptr": pointer(x), "w_ptr": "*fp32",
                    "mean_ptr": "*fp32", "var_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", **ints, "eps": "fp32",
                    **strides("x", "dy", "dx")},
                   dict(HAS_WEIGHT=affine, ACC=acc, ONE_PASS=one_pass, BLOCK=block), options)


def ptxas_report(kernel, arch: int) -> str:
    """Registers, spill bytes and stack frame of a compiled kernel, from the ptxas Triton uses."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        target = re.search(r"\.target (sm_\w+)", kernel.asm["ptx"]).group(1)  # sm_90a on Hopper
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", ptx.name,
                              "-o", "/dev/null"], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log).group(1)
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    stack = re.search(r"(\d+) bytes stack frame", log).group(1)
    return f"registers {regs:>3}  spill stores {stores:>4} B  spill loads {loads:>4} B  stack {stack:>4} B"


# Optimizer kernels: every sqrt and division IEEE-rounded (multi_tensor.sqrt_ieee). The
# compiler's defaults (sqrt.approx.ftz, div.full) flush subnormals to 0, which made a
# tensor with a sum of squares below 2^-126 read as norm 0 on a GPU; the interpreter
# cannot show it, the PTX can.
APPROXIMATE = re.compile(r"\b(?:sqrt|div|rcp|rsqrt)\.(?:approx|full)\.[\w.]+")
OPTIMIZER_KERNELS = ("fastlars.ops.multi_tensor", "fastlars.ops.lars_step", "fastlars.ops.lamb_step")


def approximate_math(fn, kernel) -> list[str]:
    """The approximate sqrt/division instructions in an optimizer kernel's PTX (none allowed)."""
    if fn.fn.__module__ not in OPTIMIZER_KERNELS:
        return []
    return sorted(set(APPROXIMATE.findall(kernel.asm["ptx"])))


# 16-B vector loads (ld.global.v4.b32; fp64: ld.global.v2.b64): what ALIGNED and the unmasked
# full blocks are for. An optimizer kernel compiled ALIGNED without one has lost them (a mask
# bounded by a loaded numel, a pointer not hinted), and would move its bytes in 4-B pieces.
VECTOR_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*\.(?:v4\.b32|v2\.b64)\b")


def wants_vector_loads(fn, constexprs) -> bool:
    """An optimizer kernel's ALIGNED variant: its PTX must hold a 16-B vector load."""
    return fn.fn.__module__ in OPTIMIZER_KERNELS and constexprs.get("ALIGNED") is True


def census(kernel) -> str:
    """What the PTX of a variant executes per program, by kind: instructions of the body,
    IEEE square roots and divisions, selects and predicated instructions, 16-B vector loads."""
    ptx = kernel.asm["ptx"]
    body = [line for line in ptx.splitlines() if re.match(r"\s+[a-z@]", line) and not line.strip().startswith(".")]
    counts = (len(body), len(re.findall(r"\bsqrt\.rn", ptx)), len(re.findall(r"\bdiv\.rn", ptx)),
              len(re.findall(r"\bselp\b|@!?%p", ptx)), len(VECTOR_LOAD.findall(ptx)))
    return "instructions {:4}  sqrt.rn {:3}  div.rn {:3}  selects/predicated {:4}  16-B loads {:3}".format(*counts)


# The one-launch kernels' ordering (multi_tensor.take_item ... wait_for_norms): the ticket,
# the count of a tensor's norm items (acq_rel), the release of its totals, the acquire of
# the waiting update items, and the CTA barriers around them. The interpreter runs programs
# one after another and ignores all of these; only the PTX shows that none was lost.
ONE_LAUNCH_ORDERING = {
    "acq_rel count": re.compile(r"\batom\.global\.gpu\.acq_rel\.add\b"),
    "release": re.compile(r"\batom\.global\.gpu\.release\.add\b"),
    "acquire": re.compile(r"\b(?:ld|atom)\.global\.gpu\.acquire\b"),
    "barrier": re.compile(r"\bbar\.sync\b"),
}


# ...and no load through the non-coherent read-only path, which may serve a line another
# program has written since (the partials and totals are written in the same launch)
NON_COHERENT_LOAD = re.compile(r"\bld\.global\.nc\b")


def lost_ordering(fn, kernel) -> list[str]:
    """The orderings (ONE_LAUNCH_ORDERING) missing from a one-launch kernel's PTX, and a
    non-coherent load if it has one."""
    if not fn.__name__.endswith("_one_launch_kernel"):
        return []
    ptx = kernel.asm["ptx"]
    lost = [name for name, pattern in ONE_LAUNCH_ORDERING.items() if not pattern.search(ptx)]
    return lost + (["coherent loads (found ld.global.nc)"] if NON_COHERENT_LOAD.search(ptx) else [])


def describe(fn, signature, constexprs, options) -> str:
    dtypes = "/".join(v for k, v in signature.items() if k in ("x_ptr", "table"))
    flags = " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items())
    return f"{fn.__name__} {dtypes} {flags} num_warps={options.get('num_warps', 4)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", type=int, default=[80, 90])
    parser.add_argument("--ptxas", action="store_true", help="print each variant's ptxas resource report")
    parser.add_argument("--census", action="store_true",
                        help="print each variant's instruction census (instructions, sqrt.rn, div.rn, selects, "
                             "16-B loads)")
    parser.add_argument("--warps", nargs="+", type=int, help="Ghost BN kernels at these warp counts")
    args = parser.parse_args(argv)
    compiled = vector_checked = 0
    for fn, signature, constexprs, options in variants(args.warps):
        full = {**signature, **{k: "constexpr" for k in constexprs}}
        missing = set(fn.arg_names) - set(full)
        assert not missing, f"{fn.__name__}: no type for {missing}"
        source = ASTSource(fn=fn, signature={name: full[name] for name in fn.arg_names}, constexprs=constexprs)
        for arch in args.archs:
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            compiled += 1
            approx = approximate_math(fn, kernel)
            assert not approx, f"sm_{arch} {describe(fn, signature, constexprs, options)}: {approx}"
            lost = lost_ordering(fn, kernel)
            assert not lost, f"sm_{arch} {describe(fn, signature, constexprs, options)}: no {lost} in the PTX"
            if wants_vector_loads(fn, constexprs):
                assert VECTOR_LOAD.search(kernel.asm["ptx"]), \
                    f"sm_{arch} {describe(fn, signature, constexprs, options)}: no 16-B vector load (ld.global.v4)"
                vector_checked += 1
            if args.census:
                print(f"sm_{arch} {describe(fn, signature, constexprs, options)}: {census(kernel)}", flush=True)
            if args.ptxas:
                print(f"sm_{arch} {describe(fn, signature, constexprs, options)}: {ptxas_report(kernel, arch)}",
                      flush=True)
    print(f"compiled {compiled} kernel variants for sm_{', sm_'.join(map(str, args.archs))}; "
          f"16-B vector loads in all {vector_checked} ALIGNED optimizer variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
