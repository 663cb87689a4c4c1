"""``make bench-check``: no regression without a number.

    python -m bench.check [--baseline bench/baseline-cpu.json] [--update-baseline]
                          [--plant-slowdown ROW=FACTOR] [--tolerance 0.15] [--with-reference]
                          [--rounds 9] [--workloads resnet50 tiny2000] [--no-save] [--result JSON]

Runs the optimizer-step benchmark on the CPU (bench.optim_step: ResNet-50's shapes and the
2,000 tiny tensors; every fastlars CPU backend but the reference, each LARS/LAMB variant
option, bf16 with master weights, timm, torch's fused SGD/AdamW; all rows of a workload
interleaved in one run) and compares each row's ratio to torch's fused step of the same run
(the median over rounds of the per-round ratios) with the committed baseline. It fails
(exit 1) when a ratio is more than 15 % above its baseline, when a baseline row was not
measured (a row that crashed is not a pass), or when ``backend="auto"`` picked a backend
this run measured slower than another one it measured. Ratios, not milliseconds, so that
the baseline holds on another machine; the CPU and the thread count still shape them, so
regenerate the baseline (``--update-baseline``) when the machine changes.

It also reports the performance targets (LARS/LAMB within 1.3x of torch's fused step, LAMB
2x faster than timm, each variant option within 1.15x of its default, no fastlars CPU path
slower than timm on the tiny tensors) as PASS/FAIL lines. They are what the kernels aim
for; they do not decide the exit status.

``--plant-slowdown 'LAMB[cpu]=1.5'`` (or FASTLARS_BENCH_PLANT) makes a row's every timed
step last 1.5 times as long, to show once that the check catches it. Not part of
``make test``: it times, and timing belongs in bench/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench import optim_step
from bench.optim_step import row_ratio

BASELINE = Path(__file__).parent / "baseline-cpu.json"
WORKLOADS = ["resnet50", "tiny2000"]
TOLERANCE = 0.15          # a ratio more than 15 % above its baseline fails
AUTO_TOLERANCE = 0.05     # auto's pick may be this much slower than another backend: the noise of one ratio
TARGET_VS_FUSED = 1.3     # LARS/LAMB cpu vs torch's fused SGD/AdamW (ResNet-50)
TARGET_VS_TIMM_LAMB = 2.0  # LAMB cpu at least this many times faster than timm's Lamb (ResNet-50)
TARGET_VARIANT = 1.15     # each variant option vs its default (ResNet-50)
TARGET_WORKLOAD = "resnet50"
TINY_WORKLOAD = "tiny2000"


# the reasons rows_for gives for a row left out by the run's options, not by a failure
LEFT_OUT_BY_CHOICE = ("(--rows)", "(--no-variants)", "(--no-reference)")


def key(row: dict) -> str:
    return f"{row['workload']}:{row['label']}"


def ratios_of(result: dict) -> dict[str, dict]:
    """workload:label -> the row's ratio to its floor (median, min, max over rounds of the
    per-round ratios), for every row that has a floor and was measured with it."""
    ratios = {key(r): row_ratio(result, r["workload"], r["label"], r["floor"]) for r in result["rows"]
              if r["floor"] is not None}
    return {k: v for k, v in ratios.items() if v["median"] is not None}


def make_baseline(result: dict) -> dict:
    return dict(
        about="bench/check.py's baseline: each row's ratio to torch's fused step of the same run "
              "(median over rounds of the per-round ratios). Regenerate: make bench-check ARGS=--update-baseline",
        command=result["command"], date=result["date"], device=result["device"], threads=result["threads"],
        torch=result["torch"], fastlars=result["fastlars"], commit=_commit(), rounds=result["rounds"],
        ratios=ratios_of(result))


def compare(result: dict, baseline: dict, tolerance: float = TOLERANCE) -> list[dict]:
    """One line per row of the baseline or of the run: baseline ratio, now, change, verdict
    ("ok", "faster", "SLOWER", "NOT MEASURED", "new", "left out"); SLOWER and NOT MEASURED
    fail. A row left out by the run's options (another workload, --rows) is no failure; a
    row that raised or could not be built is."""
    now, before = ratios_of(result), baseline["ratios"]
    chosen_out = {f"{w}:{line.partition(': ')[0]}" for w, record in result["workloads"].items()
                  for line in record["left_out"] if line.endswith(LEFT_OUT_BY_CHOICE)}
    lines = []
    for k in [*before, *(k for k in now if k not in before)]:
        b = before.get(k, {}).get("median")
        n = now.get(k, {}).get("median")
        if n is None and (k.partition(":")[0] not in result["workloads"] or k in chosen_out):
            verdict, change = "left out", None  # by this run's options (--workloads, --rows, ...)
        elif n is None:
            verdict, change = "NOT MEASURED", None
        elif b is None:
            verdict, change = "new", None
        else:
            change = n / b - 1
            verdict = "SLOWER" if change > tolerance else "faster" if change < -tolerance else "ok"
        spread = now.get(k)
        lines.append(dict(row=k, baseline=b, now=n, now_min=spread and spread["min"], now_max=spread and spread["max"],
                          change=change, verdict=verdict, fails=verdict in ("SLOWER", "NOT MEASURED")))
    return lines


def _rows(result: dict, workload: str) -> dict[str, dict]:
    return {r["label"]: r for r in result["rows"] if r["workload"] == workload}


def gated_bound(result: dict, workload: str, floor: str) -> float | None:
    """The lowest ratio to ``floor`` (torch's fused step) that a step gated on its gradients
    can reach in this run: the gate reads every fp32 gradient before anything is written,
    and the update then moves at least the floor's bytes, so such a step takes at least
    floor + one read of the gradients (the run's ``sum`` row scaled to the gradients' bytes,
    bench.optim_step). Median over rounds of 1 + read / floor; None where the run has no
    read samples (an older JSON, --no-bandwidth)."""
    reads = result["workloads"].get(workload, {}).get("gradient_read_ms") or []
    floor_row = _rows(result, workload).get(floor)
    if not reads or floor_row is None:
        return None
    return statistics.median(1 + r / f for r, f in zip(reads, floor_row["samples_ms"]))


def targets(result: dict) -> list[dict]:
    """The performance targets, measured in this run (PASS/FAIL/MISSING, reported only).
    The two targets against torch's fused step carry the bound of a gated step
    (gated_bound); FAIL becomes "FAIL, below this run's bound" where the target lies under it."""
    lines = []

    def target(text: str, label: str, other: str, limit: float, *, workload: str = TARGET_WORKLOAD,
               inverse: bool = False, bound: float | None = None) -> None:
        q = row_ratio(result, workload, other, label) if inverse else row_ratio(result, workload, label, other)
        value = q["median"]
        ok = None if value is None else value >= limit if inverse else value <= limit
        verdict = "MISSING" if ok is None else "PASS" if ok else "FAIL"
        if verdict == "FAIL" and bound is not None and bound > limit:
            verdict = f"FAIL, below this run's bound {bound:.2f}x"
        lines.append(dict(target=text, value=value, limit=limit, bound=bound, verdict=verdict))

    for family, floor in (("LARS", "SGD[torch,fused]"), ("LAMB", "AdamW[torch,fused]")):
        target(f"{family}[cpu] <= 1.3x torch's fused {floor.partition('[')[0]}", f"{family}[cpu]", floor,
               TARGET_VS_FUSED, bound=gated_bound(result, TARGET_WORKLOAD, floor))
    target("LAMB[cpu] >= 2x faster than timm Lamb", "LAMB[cpu]", "LAMB[timm]", TARGET_VS_TIMM_LAMB, inverse=True)
    for label, r in _rows(result, TARGET_WORKLOAD).items():
        if r["variant_of"] and r["backend"] == "cpu":
            target(f"{label} <= 1.15x {r['variant_of']}", label, r["variant_of"], TARGET_VARIANT)
    for label, r in _rows(result, TINY_WORKLOAD).items():
        if r["backend"] not in ("torch", "timm", "reference") and r["dtype"] == "float32" and not r["graph"]:
            target(f"{TINY_WORKLOAD}: {label} no slower than timm", label, f"{r['optimizer']}[timm]", 1.0,
                   workload=TINY_WORKLOAD)
    return lines


def auto_checks(result: dict, tolerance: float = AUTO_TOLERANCE) -> list[dict]:
    """Per workload and optimizer: the backend "auto" picked against every other backend
    this run measured (default options, fp32); fails where the pick was slower by more
    than ``tolerance`` (median of the per-round ratios)."""
    lines = []
    for workload, w in result["workloads"].items():
        rows = _rows(result, workload)
        for family, picked in w["auto"].items():
            mine = f"{family}[{picked}]"
            others = [label for label, r in rows.items() if r["optimizer"] == family and label != mine
                      and r["backend"] not in ("torch", "timm") and not r["variant_of"] and not r["graph"]
                      and r["dtype"] == "float32"]
            versus = {other: row_ratio(result, workload, mine, other)["median"] for other in others}
            measured = mine in rows
            slower = [o for o, v in versus.items() if v is not None and v > 1 + tolerance]
            lines.append(dict(workload=workload, optimizer=family, picked=picked, versus=versus,
                              verdict="NOT MEASURED" if not measured else "FAIL" if slower else "ok",
                              fails=bool(slower)))
    return lines


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "x") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def report(result: dict, baseline: dict | None, tolerance: float = TOLERANCE,
           auto_tolerance: float = AUTO_TOLERANCE) -> tuple[str, bool]:
    """The check's text (markdown tables, for a closing note) and whether it failed."""
    out, failed = [], False
    out.append(f"bench-check: {result['device']}, torch {result['torch']}, fastlars {result['fastlars']}, "
               f"{result['date']}, {result['rounds']} rounds, rows interleaved")
    out.append(f"command: {result['command']}")
    for workload, w in result["workloads"].items():
        copy_ = _fmt(w["copy_GBps"], ".0f", " GB/s")
        out.append(f"{workload}: copy_ {copy_}, sum {_fmt(w['read_GBps'], '.0f', ' GB/s')} (the floor's bandwidth; "
                   "the headline is the ratio to torch's fused step)")
    if result["planted_slowdowns"]:
        out.append("PLANTED SLOWDOWNS: " + ", ".join(f"{k} x{v:g}" for k, v in result["planted_slowdowns"].items()))
    out.append("")
    if baseline is None:
        out.append("no baseline to compare with")
    else:
        out.append(f"Ratio to torch's fused step (SGD for LARS rows, AdamW for LAMB rows), median of {result['rounds']} "
                   f"rounds; baseline: {baseline['date']} ({baseline['device']}, commit {baseline.get('commit')}); "
                   f"fails when more than {tolerance:.0%} slower")
        out.append("")
        out.append("| row | baseline | now (min-max) | change | verdict |")
        out.append("| --- | ---: | ---: | ---: | --- |")
        for line in compare(result, baseline, tolerance):
            now = "-" if line["now"] is None else \
                f"{line['now']:.2f}x ({line['now_min']:.2f}-{line['now_max']:.2f})"
            change = "-" if line["change"] is None else f"{line['change']:+.0%}"
            out.append(f"| {line['row']} | {_fmt(line['baseline'])} | {now} | {change} | {line['verdict']} |")
            failed |= line["fails"]
    out.append("")
    out.append(f'backend="auto" against the other backends this run measured (fails when its pick is more than '
               f"{auto_tolerance:.0%} slower than another):")
    for line in auto_checks(result, auto_tolerance):
        versus = ", ".join(f"{_fmt(v)} {o}" for o, v in line["versus"].items()) or "no other backend measured"
        out.append(f"  {line['workload']} {line['optimizer']}: auto picks {line['picked']!r}; its time vs {versus}: "
                   f"{line['verdict']}")
        failed |= line["fails"]
    out.append("")
    out.append("Targets (reported; they do not decide the exit status; ratios are medians of per-round ratios):")
    out.append("")
    out.append("| target | measured | bound of a gated step | verdict |")
    out.append("| --- | ---: | ---: | --- |")
    for line in targets(result):
        out.append(f"| {line['target']} | {_fmt(line['value'])} | {_fmt(line.get('bound'))} | {line['verdict']} |")
    out.append("")
    out.append("(bound: torch's fused step plus one read of the fp32 gradients at this run's read bandwidth, "
               "the least a step gated on its gradients can take; bench.check.gated_bound)")
    for e in result["errors"]:
        out.append(f"error: {e}")
    out.append("")
    out.append("bench-check: " + ("FAILED (a ratio regressed, a baseline row was not measured, or auto picked a "
                                  "slower backend)" if failed else "passed")
               + "; exit status decided by the baseline comparison and the auto check only")
    return "\n".join(out), failed


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--update-baseline", action="store_true", help="write this run's ratios as the baseline")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="fail above baseline * (1 + this)")
    parser.add_argument("--auto-tolerance", type=float, default=AUTO_TOLERANCE)
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=list(optim_step.WORKLOADS))
    parser.add_argument("--with-reference", action="store_true", help="time the reference backend too (slow)")
    parser.add_argument("--result", type=Path, help="check the JSON of an earlier run instead of timing now")
    optim_step.add_run_arguments(parser)
    args = parser.parse_args(argv)
    plants = optim_step.parse_plants(args.plant_slowdown + optim_step.plants_from_env())
    if args.update_baseline and plants:
        parser.error("--update-baseline with a planted slowdown would record the slowdown")
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    path = None if args.no_save else optim_step.results_path(dict(date=date), "bench_check-cpu", args.results)
    command = " ".join(["python -m bench.check", *(argv if argv is not None else sys.argv[1:])])
    if args.result:
        result, path = json.loads(args.result.read_text()), None
        print(f"checking {args.result} (measured by: {result['command']})")
    else:
        result = optim_step.run(torch.device("cpu"), args.workloads, rounds=args.rounds,
                                min_run_time=args.min_run_time, reference=args.with_reference, select=args.rows,
                                plants=plants, path=path, command=command)
        optim_step.print_table(result)
    print()
    baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else None
    if args.update_baseline:
        args.baseline.write_text(json.dumps(make_baseline(result), indent=2) + "\n")
        print(f"wrote the baseline {args.baseline}")
        baseline = json.loads(args.baseline.read_text())
    text, failed = report(result, baseline, args.tolerance, args.auto_tolerance)
    print(text)
    if path:
        print(f"wrote {path}")
    if baseline is None:
        print(f"no baseline at {args.baseline}: run with --update-baseline to make one")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
