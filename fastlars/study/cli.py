"""``python -m fastlars.study``: the sweep, its cache and its outputs."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch
from tqdm import tqdm

from .core import DATASETS, MODELS, RECIPES, load_data, train_run
from .figures import figures
from .report import markdown, summarise
from .search import StudyPlan, canonical_cells, replay

# Batches 16..1024 of 11,200 training samples cover ImageNet's 1.8K..117K by share of the training set per
# step (x 114). Recipes cut to four for the 30-minute budget on 2 cores (the others run with --recipes).
DEFAULT = dict(dataset="mnist1d", model="cnn", samples=16_000, seeds=5, search_seeds=3, batches="16,32,64,128,256,512,1024",
               recipes="sgd,goyal,lars,lamb", ref_batch=64, target=0.8, workers=2, cap_epochs=3.0, min_cap=400,
               epochs=8, epoch_batches="16,64,256,1024", sharpness_subset=256, sharpness_iters=10)
# --quick: the whole pipeline on a small slice, under a minute
QUICK = dict(samples=1_200, seeds=3, search_seeds=2, batches="16,64", recipes="sgd,lars", target=0.3, workers=1, cap_epochs=1.0,
             min_cap=20, epochs=1, epoch_batches="64", sharpness_subset=64, sharpness_iters=3)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlars.study", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a small smoke run of the whole pipeline (< 1 min)")
    p.add_argument("--dataset", default=None, help=f"one of {DATASETS} (default mnist1d)")
    p.add_argument("--model", default=None, help=f"one of {tuple(MODELS)} (default cnn)")
    p.add_argument("--recipes", default=None, help=f"comma-separated, from {', '.join(RECIPES)}, or 'all' "
                                                  "(default sgd,goyal,lars,lamb)")
    p.add_argument("--batches", default=None, help="comma-separated global batch sizes")
    p.add_argument("--seeds", type=int, default=None, help="seeds of every cell's chosen lr")
    p.add_argument("--search-seeds", type=int, default=None, help="seeds per lr while searching (<= --seeds)")
    p.add_argument("--cap-epochs", type=float, default=None,
                   help="steps-to-target: the step cap is this many epochs, and at least --min-cap steps")
    p.add_argument("--min-cap", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="the fixed-epoch view's budget")
    p.add_argument("--epoch-batches", default=None, help="batches of the fixed-epoch view ('none': no such runs)")
    p.add_argument("--samples", type=int, default=None, help="mnist1d num_samples (80%% train incl. validation)")
    p.add_argument("--ref-batch", type=int, default=None, help="the batch the lr rules scale from")
    p.add_argument("--target", type=float, default=None, help="target validation accuracy for steps-to-target")
    p.add_argument("--workers", type=int, default=None, help="runs trained in parallel (one thread each)")
    p.add_argument("--out", type=Path, default=Path("bench/results/study"))
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the tables and figures from the runs already cached (no dataset needed)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _ints(name: str, value: str) -> list[int]:
    if value.strip() == "none":
        return []
    try:
        return sorted({int(b) for b in value.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {value!r}") from None


def _config(args: argparse.Namespace) -> dict:
    cfg = dict(DEFAULT)
    if args.quick:
        cfg.update(QUICK)
    for key in ("dataset", "model", "recipes", "batches", "seeds", "search_seeds", "cap_epochs", "min_cap", "epochs",
                "epoch_batches", "samples", "ref_batch", "target", "workers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["dataset"] not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, got {cfg['dataset']!r}")
    if cfg["model"] not in MODELS:
        raise ValueError(f"--model must be one of {tuple(MODELS)}, got {cfg['model']!r}")
    recipes = list(RECIPES) if cfg["recipes"] == "all" else [r.strip() for r in cfg["recipes"].split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise ValueError(f"--recipes: unknown {unknown or recipes!r}; choose from {', '.join(RECIPES)}")
    batches, epoch_batches = _ints("batches", str(cfg["batches"])), _ints("epoch-batches", str(cfg["epoch_batches"]))
    if not batches or min(batches) < 2:
        raise ValueError(f"--batches must be integers >= 2, got {cfg['batches']!r}")
    if not set(epoch_batches) <= set(batches):
        raise ValueError(f"--epoch-batches must be among --batches, got {cfg['epoch_batches']!r}")
    cfg["search_seeds"] = min(cfg["search_seeds"], cfg["seeds"])
    for key in ("seeds", "search_seeds", "epochs", "samples", "ref_batch", "workers", "min_cap"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if not cfg["cap_epochs"] > 0:
        raise ValueError(f"--cap-epochs must be > 0, got {cfg['cap_epochs']}")
    if not 0 < cfg["target"] <= 1:
        raise ValueError(f"--target must be in (0, 1], got {cfg['target']}")
    cfg.update(recipes=recipes, batches=batches, epoch_batches=epoch_batches)
    return cfg


_DATA: dict = {}


def _init_worker(data: dict) -> None:
    torch.set_num_threads(1)
    _DATA["data"] = data


def _work(job: tuple) -> dict:
    spec, kwargs = job
    return train_run(spec, _DATA["data"], **kwargs)


def _cached_n_train(cache: dict, cfg: dict) -> int | None:
    for record in cache.values():
        spec = record["spec"]
        if (spec["dataset"], spec["samples"]) == (cfg["dataset"], cfg["samples"] if cfg["dataset"] == "mnist1d" else 0):
            return record["n_train"]
    return None


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args)
    except ValueError as e:
        _parser().error(str(e))
    start, load_start = time.perf_counter(), os.getloadavg()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "runs.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    data = None
    if args.report_only:
        n = _cached_n_train(cache, cfg)
        if n is None:
            _parser().error(f"--report-only: no cached run of this dataset in {cache_path}")
    else:
        data = load_data(cfg["dataset"], cfg["samples"])
        n = len(data["y"])
    too_big = [b for b in cfg["batches"] if b > n]
    if too_big:
        _parser().error(f"--batches {too_big} larger than the training set ({n} samples)")
    plan = StudyPlan(cfg["dataset"], cfg["model"], cfg["samples"] if cfg["dataset"] == "mnist1d" else 0, n,
                     cfg["ref_batch"], tuple(range(cfg["seeds"])), cfg["search_seeds"], cfg["target"], cfg["cap_epochs"], cfg["min_cap"],
                     cfg["epochs"], tuple(cfg["epoch_batches"]))
    same_as = canonical_cells(cfg["recipes"], cfg["batches"], plan)
    cells = [c for c, ref in same_as.items() if ref is None]
    trained = 0
    if not args.report_only:
        print(f"{cfg['dataset']} ({n} train / {len(data['y_val'])} val / {len(data['y_test'])} test), {cfg['model']}, "
              f"{len(cells)} cells of {len(same_as)} run ({len(same_as) - len(cells)} repeat another cell), "
              f"{cfg['seeds']} seeds, cache {cache_path}")
        trained = _train(cells, plan, cache, cache_path, data, cfg, progress=not args.no_progress)
    summary = summarise(plan, same_as, cache, cfg["recipes"])
    title = f"{cfg['dataset']} {cfg['model']}"
    paths = figures(summary, out, title)
    table = markdown(summary)
    wall = time.perf_counter() - start
    (out / "results.md").write_text(f"# Large-batch study: {title}\n\n{table}")
    records = [r for r in cache.values() if r["key"] in summary["run_keys"]]
    # The invocation that trained: its wall time, CPU time (this process and its workers) and the load
    # average (1, 5, 15 min) at its start and end, the machine being shared. A --report-only invocation
    # keeps the training invocation's figures and adds its own wall time.
    invocation = {"invocation_wall_s": wall, "runs_trained_by_invocation": trained, "cpu_s": _cpu_seconds(),
                  "cpu_count": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    previous_path = out / "results.json"
    if args.report_only and previous_path.exists():
        previous = json.loads(previous_path.read_text())
        invocation = {k: previous[k] for k in invocation if k in previous}
        invocation["report_only_wall_s"] = wall
    previous_path.write_text(json.dumps({
        "config": cfg, "plan": {**vars(plan), "caps": {b: plan.cap(b) for b in cfg["batches"]}}, **invocation,
        "sum_of_run_wall_s": sum(r["wall_s"] for r in records), **summary.get("json", {}),
        "cells": summary["cells"]}, indent=1, default=str))
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(p) for p in paths))
    missing = sum(c["pending"] for c in summary["cells"])
    print(f"wall time {wall:.0f} s, CPU time {_cpu_seconds():.0f} s ({trained} runs trained, {missing} cells "
          f"incomplete), load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    return {"summary": summary, "trained": trained, "wall_s": wall}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _train(cells, plan: StudyPlan, cache: dict, cache_path: Path, data: dict, cfg: dict, progress: bool) -> int:
    """Every cell's search, one round at a time per cell, the cells in parallel; each finished
    run goes to the cache at once."""

    def kwargs(spec):
        return dict(noise_scale=spec.recipe == "sgd" and not spec.early_stop and spec.batch == cfg["ref_batch"],
                    sharpness_subset=cfg["sharpness_subset"], sharpness_iters=cfg["sharpness_iters"])

    def next_job(cell):
        spec = replay(plan, *cell, cache)["pending"]
        return None if spec is None else (spec, kwargs(spec))

    # the costly cells first, so that parallel workers finish together
    todo = sorted(cells, key=lambda c: -c[1])
    trained = 0
    with tqdm(disable=not progress, unit="run") as bar:
        if cfg["workers"] == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for cell in todo:
                    while (job := next_job(cell)) is not None:
                        _store(cache, cache_path, train_run(job[0], data, progress=bar, **job[1]), bar)
                        trained += 1
            finally:
                torch.set_num_threads(threads)
            return trained
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(cfg["workers"], ctx, _init_worker, (data,)) as pool:
            running = {}
            for cell in todo:
                if (job := next_job(cell)) is not None:
                    running[pool.submit(_work, job)] = cell
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    cell = running.pop(future)
                    _store(cache, cache_path, future.result(), bar)
                    trained += 1
                    if (job := next_job(cell)) is not None:
                        running[pool.submit(_work, job)] = cell
    return trained


def _store(cache: dict, path: Path, record: dict, bar) -> None:
    cache[record["key"]] = record
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache))
    tmp.replace(path)  # atomic: an interrupted study never leaves a broken cache
    bar.update(1)
