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
from .search import PAPER_RUNS, StudyPlan, paper_spec, replay

TUNED = [name for name, r in RECIPES.items() if r.tuned]
# Two workloads on MNIST-1D, both with batch norm: the small CNN and a 14-layer residual network.
# The default fits 30 minutes on 2 cores: batches x4 apart from the reference (32) to 512, the
# momentum fixed at 0.9 (searched with --full), the papers' prescriptions on the CNN.
DEFAULT = dict(dataset="mnist1d", samples=16_000, workloads="cnn,resnet", batches="32,128,512",
               recipes=",".join(TUNED), ref_batch=32, targets="0.95,0.8", epochs="cnn:6,resnet:5", warmups="0,0.5",
               search_seeds=2, report_seeds=5, search_momentum=False, papers="cnn", workers=2,
               sharpness_subset=256, sharpness_iters=10)
# --full: what does not fit the default's budget (x2 batches up to 1024, momentum searched, papers on both)
FULL = dict(batches="32,64,128,256,512,1024", search_momentum=True, papers="cnn,resnet")
# --quick: the whole pipeline on a small slice, under a minute
QUICK = dict(samples=1_200, batches="16,64", recipes="sgd,lars", ref_batch=16, targets="0.5,0.3",
             epochs="cnn:1,resnet:1", search_seeds=1, report_seeds=2, workers=1, sharpness_subset=64,
             sharpness_iters=3)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlars.study", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a small smoke run of the whole pipeline (< 1 min)")
    mode.add_argument("--full", action="store_true", help="x2 batches to 1024, momentum searched, papers on every "
                                                          "workload (several hours on 2 cores)")
    p.add_argument("--dataset", default=None, help=f"one of {DATASETS} (default mnist1d)")
    p.add_argument("--workloads", default=None, help=f"comma-separated models, from {tuple(MODELS)}")
    p.add_argument("--recipes", default=None, help=f"tuned recipes, comma-separated, from {', '.join(TUNED)}")
    p.add_argument("--batches", default=None, help="comma-separated global batch sizes (the first is the smallest)")
    p.add_argument("--report-seeds", type=int, default=None, help="held-out seeds of every cell's chosen point")
    p.add_argument("--search-seeds", type=int, default=None, help="seeds per point while searching")
    p.add_argument("--epochs", default=None, help="the budget in epochs: a number, or 'model:epochs,...'")
    p.add_argument("--warmups", default=None, help="warm-up lengths searched, in epochs, comma-separated")
    p.add_argument("--targets", default=None, help="validation accuracies, comma-separated; the first is primary")
    p.add_argument("--papers", default=None, help="workloads that run the papers' prescriptions ('none': none)")
    p.add_argument("--samples", type=int, default=None, help="mnist1d num_samples (80%% train incl. validation)")
    p.add_argument("--ref-batch", type=int, default=None, help="the reference (small) batch")
    p.add_argument("--workers", type=int, default=None, help="runs trained in parallel (one thread each)")
    p.add_argument("--out", type=Path, default=Path("bench/results/study"))
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the tables and figures from the runs already cached (no dataset needed)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _numbers(name: str, value: str, kind=int) -> list:
    if str(value).strip() == "none":
        return []
    try:
        return sorted({kind(b) for b in str(value).split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated numbers, got {value!r}") from None


def _epochs(value: str, workloads: list[str]) -> dict[str, float]:
    try:
        if ":" not in str(value):
            return {w: float(value) for w in workloads}
        given = {k.strip(): float(v) for k, v in (item.split(":") for item in str(value).split(","))}
    except ValueError:
        raise ValueError(f"--epochs must be a number or 'model:epochs,...', got {value!r}") from None
    missing = [w for w in workloads if w not in given]
    if missing:
        raise ValueError(f"--epochs names no budget for {missing}")
    return {w: given[w] for w in workloads}


def _config(args: argparse.Namespace) -> dict:
    cfg = dict(DEFAULT)
    if args.quick:
        cfg.update(QUICK)
    if args.full:
        cfg.update(FULL)
    for key in ("dataset", "workloads", "recipes", "batches", "report_seeds", "search_seeds", "epochs", "warmups",
                "targets", "papers", "samples", "ref_batch", "workers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["dataset"] not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, got {cfg['dataset']!r}")
    workloads = [w.strip() for w in cfg["workloads"].split(",") if w.strip()]
    if not workloads or any(w not in MODELS for w in workloads):
        raise ValueError(f"--workloads must name models from {tuple(MODELS)}, got {cfg['workloads']!r}")
    recipes = [r.strip() for r in cfg["recipes"].split(",") if r.strip()]
    if not recipes or any(r not in TUNED for r in recipes) or "sgd" not in recipes:
        raise ValueError(f"--recipes must include sgd and be from {', '.join(TUNED)}, got {cfg['recipes']!r}")
    batches = _numbers("batches", cfg["batches"])
    if len(batches) < 2 or min(batches) < 2:
        raise ValueError(f"--batches needs at least two integers >= 2, got {cfg['batches']!r}")
    targets = sorted(_numbers("targets", cfg["targets"], float), reverse=True)
    if not targets or not all(0 < t <= 1 for t in targets):
        raise ValueError(f"--targets must be in (0, 1], got {cfg['targets']!r}")
    warmups = _numbers("warmups", cfg["warmups"], float)
    if not warmups or min(warmups) < 0:
        raise ValueError(f"--warmups must be >= 0 epochs, got {cfg['warmups']!r}")
    papers = [] if cfg["papers"] == "none" else [w.strip() for w in cfg["papers"].split(",") if w.strip() in workloads]
    for key in ("report_seeds", "search_seeds", "samples", "ref_batch", "workers"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["ref_batch"] not in batches:
        raise ValueError(f"--ref-batch {cfg['ref_batch']} must be one of --batches {batches}")
    epochs = _epochs(cfg["epochs"], workloads)
    if not all(e > 0 for e in epochs.values()):
        raise ValueError(f"--epochs must be > 0, got {cfg['epochs']!r}")
    cfg.update(workloads={w: {"model": w, "epochs": epochs[w], "papers": w in papers} for w in workloads},
               recipes=recipes, batches=batches, targets=targets, warmups=warmups,
               search_seeds=list(range(100, 100 + cfg["search_seeds"])), report_seeds=list(range(cfg["report_seeds"])))
    del cfg["epochs"], cfg["papers"]
    return cfg


def plans(cfg: dict, n_train: int) -> dict[str, StudyPlan]:
    return {w: StudyPlan(cfg["dataset"], spec["model"], cfg["samples"] if cfg["dataset"] == "mnist1d" else 0, n_train,
                         cfg["ref_batch"], tuple(cfg["search_seeds"]), tuple(cfg["report_seeds"]),
                         tuple(cfg["targets"]), spec["epochs"], tuple(cfg["warmups"]), tuple(cfg["batches"]),
                         cfg["search_momentum"]) for w, spec in cfg["workloads"].items()}


def cells_of(cfg: dict, plan_of: dict[str, StudyPlan]) -> list[tuple[str, str, int]]:
    """(workload, recipe, batch) of every tuned cell and paper run."""
    out = [(w, r, b) for w in plan_of for r in cfg["recipes"] for b in cfg["batches"]]
    for w, spec in cfg["workloads"].items():
        if spec["papers"]:
            out += [(w, name, b) for name, batches in PAPER_RUNS.items() for b in batches(plan_of[w])]
    return out


def next_spec(plan: StudyPlan, recipe: str, batch: int, cache: dict):
    """(spec to train, None), (None, 'waits ...') or (None, None) when the cell is complete."""
    if RECIPES[recipe].tuned:
        return replay(plan, recipe, batch, cache)["pending"], None
    spec, why = paper_spec(plan, recipe, batch, cache)
    if spec is not None and spec.key() in cache:
        return None, None
    return spec, why


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
    plan_of = plans(cfg, n)
    cells = cells_of(cfg, plan_of)
    trained = 0
    if not args.report_only:
        print(f"{cfg['dataset']} ({n} train / {len(data['y_val'])} val / {len(data['y_test'])} test), workloads "
              f"{', '.join(plan_of)}, {len(cells)} cells, search seeds {cfg['search_seeds']}, report seeds "
              f"{cfg['report_seeds']}, cache {cache_path}")
        trained = _train(cells, plan_of, cache, cache_path, data, cfg, progress=not args.no_progress)
    summary = summarise(plan_of, cells, cache)
    paths = figures(summary, out)
    table = markdown(summary)
    wall = time.perf_counter() - start
    (out / "results.md").write_text(f"# Large-batch study on {cfg['dataset']}\n\n{table}")
    # The invocation that trained: its wall time, CPU time (this process and its workers) and the load
    # average (1, 5, 15 min) at its start and end. A --report-only invocation keeps the training
    # invocation's figures and adds its own wall time.
    invocation = {"invocation_wall_s": wall, "runs_trained_by_invocation": trained, "cpu_s": _cpu_seconds(),
                  "cpu_count": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    previous_path = out / "results.json"
    if args.report_only and previous_path.exists():
        previous = json.loads(previous_path.read_text())
        invocation = {k: previous[k] for k in invocation if k in previous}
        invocation["report_only_wall_s"] = wall
    records = [r for r in cache.values() if r["key"] in summary["run_keys"]]
    previous_path.write_text(json.dumps({
        "config": cfg, "plans": {w: vars(p) for w, p in plan_of.items()}, **invocation,
        "sum_of_run_wall_s": sum(r["wall_s"] for r in records), **summary["json"]}, indent=1, default=str))
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


def _train(cells, plan_of: dict[str, StudyPlan], cache: dict, cache_path: Path, data: dict, cfg: dict,
           progress: bool) -> int:
    """Every cell's runs, one at a time per cell, the cells in parallel (a paper's run once the
    tuned cell it derives from is complete); each finished run goes to the cache at once."""
    kwargs = dict(sharpness_subset=cfg["sharpness_subset"], sharpness_iters=cfg["sharpness_iters"])
    # the costly cells first (the deeper model, the smaller batches), so that parallel workers finish together
    todo = sorted(cells, key=lambda c: (c[0] != "resnet", not RECIPES[c[1]].tuned, c[2]))
    trained = 0
    with tqdm(disable=not progress, unit="run") as bar:
        if cfg["workers"] == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                while True:
                    jobs = [s for c in todo if (s := next_spec(plan_of[c[0]], c[1], c[2], cache)[0]) is not None]
                    if not jobs:
                        break
                    _store(cache, cache_path, train_run(jobs[0], data, progress=bar, **kwargs), bar)
                    trained += 1
            finally:
                torch.set_num_threads(threads)
            return trained
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(cfg["workers"], ctx, _init_worker, (data,)) as pool:
            running: dict = {}

            def submit() -> None:
                for cell in todo:
                    if len(running) >= cfg["workers"]:
                        return
                    if cell in running.values():
                        continue
                    spec = next_spec(plan_of[cell[0]], cell[1], cell[2], cache)[0]
                    if spec is not None:
                        running[pool.submit(_work, (spec, kwargs))] = cell

            submit()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    _store(cache, cache_path, future.result(), bar)
                    trained += 1
                submit()
    return trained


def _store(cache: dict, path: Path, record: dict, bar) -> None:
    cache[record["key"]] = record
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache))
    tmp.replace(path)  # atomic: an interrupted study never leaves a broken cache
    bar.update(1)
