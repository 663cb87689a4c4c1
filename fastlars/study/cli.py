"""``python -m fastlars.study``: the sweep, its cache and its outputs."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .core import DATASETS, LR_GRIDS, MODELS, RECIPES, RunSpec, load_data, train_run
from .report import figures, markdown, summarise

DEFAULT = dict(dataset="mnist1d", model="cnn", samples=16_000, epochs=6, seeds=3, batches="64,256,1024,4096,full",
               ref_batch=64, target=0.8, workers=2, sharpness_subset=256, sharpness_iters=10)
# --quick: the whole pipeline on a small slice, under a minute
QUICK = dict(samples=1_200, epochs=2, seeds=2, batches="64,512", target=0.3, workers=1, sharpness_subset=64,
             sharpness_iters=3, lrs=2)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlars.study", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a small smoke run of the whole pipeline (< 1 min)")
    p.add_argument("--dataset", default=None, help=f"one of {DATASETS} (default mnist1d)")
    p.add_argument("--model", default=None, help=f"one of {tuple(MODELS)} (default cnn)")
    p.add_argument("--recipes", default="all", help=f"comma-separated, from {', '.join(RECIPES)} (default all)")
    p.add_argument("--batches", default=None, help="comma-separated global batch sizes; 'full': the training set")
    p.add_argument("--seeds", type=int, default=None, help="seeds per lr")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget per run")
    p.add_argument("--samples", type=int, default=None, help="mnist1d num_samples (80%% train incl. validation)")
    p.add_argument("--ref-batch", type=int, default=None, help="the small reference batch the rules scale from")
    p.add_argument("--target", type=float, default=None, help="target validation accuracy for steps-to-target")
    p.add_argument("--workers", type=int, default=None, help="runs trained in parallel (one thread each)")
    p.add_argument("--out", type=Path, default=Path("bench/results/study"))
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the table and figures from the runs already cached")
    p.add_argument("--no-progress", action="store_true")
    return p


def _config(args: argparse.Namespace) -> dict:
    cfg = dict(DEFAULT, lrs=4)
    if args.quick:
        cfg.update(QUICK)
    for key in ("dataset", "model", "batches", "seeds", "epochs", "samples", "ref_batch", "target", "workers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["dataset"] not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, got {cfg['dataset']!r}")
    if cfg["model"] not in MODELS:
        raise ValueError(f"--model must be one of {tuple(MODELS)}, got {cfg['model']!r}")
    recipes = list(RECIPES) if args.recipes == "all" else [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise ValueError(f"--recipes: unknown {unknown or recipes!r}; choose from {', '.join(RECIPES)}")
    try:
        batches = [b.strip() if b.strip() == "full" else int(b) for b in str(cfg["batches"]).split(",")]
    except ValueError:
        raise ValueError(f"--batches must be comma-separated integers or 'full', got {cfg['batches']!r}") from None
    for key in ("seeds", "epochs", "samples", "ref_batch", "workers"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if not 0 < cfg["target"] <= 1:
        raise ValueError(f"--target must be in (0, 1], got {cfg['target']}")
    if any(b != "full" and b < cfg["ref_batch"] for b in batches):
        raise ValueError(f"--batches must be >= --ref-batch ({cfg['ref_batch']}), got {cfg['batches']!r}")
    cfg.update(recipes=recipes, batches=batches)
    return cfg


_DATA: dict = {}


def _init_worker(data: dict) -> None:
    torch.set_num_threads(1)
    _DATA["data"] = data


def _work(job: tuple) -> dict:
    spec, kwargs = job
    return train_run(spec, _DATA["data"], **kwargs)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args)
    except ValueError as e:
        _parser().error(str(e))
    start = time.perf_counter()
    data = load_data(cfg["dataset"], cfg["samples"])
    n = len(data["y"])
    cfg["batches"] = sorted({n if b == "full" else b for b in cfg["batches"]})
    too_big = [b for b in cfg["batches"] if b > n]
    if too_big:
        _parser().error(f"--batches {too_big} larger than the training set ({n} samples)")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "runs.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    jobs = []
    for recipe in cfg["recipes"]:
        grid = LR_GRIDS[RECIPES[recipe].optimizer]
        lrs = grid[1:1 + cfg["lrs"]] if cfg["lrs"] < len(grid) else grid
        for batch in cfg["batches"]:
            spec = RunSpec(cfg["dataset"], cfg["model"], recipe, batch, tuple(lrs), tuple(range(cfg["seeds"])),
                           cfg["epochs"], cfg["ref_batch"], cfg["samples"] if cfg["dataset"] == "mnist1d" else 0)
            kwargs = dict(target=cfg["target"], noise_scale=recipe == "sgd" and batch == cfg["ref_batch"],
                          sharpness_subset=cfg["sharpness_subset"], sharpness_iters=cfg["sharpness_iters"])
            jobs.append((spec, kwargs))
    todo = [] if args.report_only else [j for j in jobs if j[0].key() not in cache]
    # the costly runs first, so that parallel workers finish together
    todo.sort(key=lambda j: -(3 * RECIPES[j[0].recipe].adversarial + 2 * RECIPES[j[0].recipe].longer
                              + 64 / j[0].batch))
    print(f"{cfg['dataset']} ({n} train / {len(data['y_val'])} val / {len(data['y_test'])} test), {cfg['model']}, "
          f"{len(jobs)} runs of {cfg['lrs']} lrs x {cfg['seeds']} seeds, {len(jobs) - len(todo)} cached in "
          f"{cache_path}")
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), disable=args.no_progress, unit="run") as bar:
        if cfg["workers"] > 1 and len(todo) > 1:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(cfg["workers"], len(todo)), _init_worker, (data,)) as pool:
                for record in pool.imap_unordered(_work, todo):
                    _store(cache, cache_path, record, bar)
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for spec, kwargs in todo:
                    _store(cache, cache_path, train_run(spec, data, progress=bar, **kwargs), bar)
            finally:
                torch.set_num_threads(threads)
    records = [cache[spec.key()] for spec, _ in jobs if spec.key() in cache]
    if not records:
        _parser().error(f"no finished run in {cache_path} for this configuration")
    summary = summarise(records, cfg["ref_batch"], cfg["target"])
    table = markdown(summary, cfg["target"])
    title = f"{cfg['dataset']} {cfg['model']}"
    paths = figures(summary, out, title, cfg["target"])
    wall = time.perf_counter() - start
    (out / "results.md").write_text(f"# Large-batch study: {title}\n\n{table}")
    # this invocation's wall time (a --report-only or resumed one trains little), and the runs' own
    (out / "results.json").write_text(json.dumps({"config": cfg, "summary": summary, "invocation_wall_s": wall,
                                                  "runs_trained_by_invocation": len(todo),
                                                  "sum_of_run_wall_s": sum(r["wall_s"] for r in records),
                                                  "cpu_count": os.cpu_count()}, indent=1))
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(p) for p in paths))
    print(f"wall time {wall:.0f} s ({len(todo)} runs trained, {len(records) - len(todo)} from the cache, "
          f"{len(jobs) - len(records)} missing)")
    return {"summary": summary, "trained": len(todo), "wall_s": wall}


def _store(cache: dict, path: Path, record: dict, bar) -> None:
    cache[record["key"]] = record
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache))
    tmp.replace(path)  # atomic: an interrupted study never leaves a broken cache
    bar.update(1)
