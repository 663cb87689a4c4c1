"""Do examples/train_imagenet.py's default learning rates learn? Its default (no lr flag) against
an lr sweep around it, for LARS and for LAMB, on a small real image dataset.

The data: scikit-learn's digits (1,797 scanned handwritten digits, 8x8 grey levels 0-16, 10
classes; shipped inside scikit-learn, nothing downloaded), written as 8-bit PNGs in ImageFolder
layout, ``train/<digit>/<index>.png`` and ``val/<digit>/<index>.png``. The split is stratified and
deterministic: ``sklearn.model_selection.train_test_split(test_size=0.2, stratify=labels,
random_state=0)``, 1,437 training and 360 validation images.

Each run: ``train_imagenet.py --data DIR --model resnet18 --image-size 32 --global-batch 256
--micro-batch 64 --epochs 12 --warmup-epochs 2 --workers 0`` (resnet18, not the script's
default resnet50, for CPU cost), plus ``--lamb`` and/or ``--base-lr``; 5 steps per epoch, 60 in
all; everything else is the script's default (label smoothing 0.1, Ghost BN of 32), seed 0. The
grid: the default base lr times 1/10, 1/3, 1, 3, 10 (x1 is the default run itself, no lr flag),
widened by x1/3 or x3 at a time while the best top-1 sits at an edge. Runs go one at a time, in
subprocesses; each result is kept in ``--out`` (an interrupted sweep resumes). Results: top-1 on
``val/`` after the last epoch (and after each epoch), the wall time. Then the default and the
best lr again with ``--seeds`` (model init, shuffle and augmentation): the run-to-run spread.
At global batch 256 the warmup starts at the peak lr (make_optimizer warms up from the lr of
batch 256), so the 2 warmup epochs are flat.

    OMP_NUM_THREADS=1 python bench/lr_defaults_sweep.py            # ~3 min per run on one core
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import train_imagenet  # noqa: E402  (its default lrs)

RUN = ["--model", "resnet18", "--image-size", "32", "--global-batch", "256", "--micro-batch", "64",
       "--epochs", "12", "--warmup-epochs", "2", "--workers", "0"]
FACTORS = (0.1, 1 / 3, 1.0, 3.0, 10.0)  # x1: the default run (no --base-lr)


def write_digits(root: Path) -> Path:
    """scikit-learn's digits as PNGs in ImageFolder layout, split 80/20, stratified, seeded."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if (root / "done").is_file():
        return root
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, val = train_test_split(indices, test_size=0.2, stratify=digits.target, random_state=0)
    for split, chosen in (("train", train), ("val", val)):
        for i in chosen:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)  # grey levels 0-16 -> 0-255
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    (root / "done").write_text(f"{len(train)} train, {len(val)} val\n")
    return root


def run(data: Path, optimizer: str, factor: float, out: Path, seed: int = 0) -> dict:
    """One training run (cached in ``out``): its final top-1 and wall time."""
    name = f"{optimizer.lower()}-x{factor:.4g}-seed{seed}.json"
    if (out / name).is_file():
        return json.loads((out / name).read_text())
    default = train_imagenet.LAMB_PUBLISHED_BASE_LR if optimizer == "LAMB" else train_imagenet.LARS_PUBLISHED_BASE_LR
    flags = [*RUN, "--seed", str(seed), *(["--lamb"] if optimizer == "LAMB" else [])]
    if factor != 1.0:
        flags += ["--base-lr", f"{default * factor:.6g}"]
    command = [sys.executable, str(ROOT / "examples" / "train_imagenet.py"), "--data", str(data), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    evals = [line for line in lines if line["event"] == "eval"]
    start_line = next(line for line in lines if line["event"] == "start")
    result = {"optimizer": optimizer, "factor": factor, "default": factor == 1.0, "seed": seed,
              "base_lr": default * factor, "peak_lr": start_line["peak_lr"], "top1": evals[-1]["top1"],
              "top5": evals[-1]["top5"], "top1_per_epoch": [e["top1"] for e in evals],
              "final_loss": [line for line in lines if line["event"] == "train"][-1]["loss"],
              "wall_s": seconds, "command": " ".join(["OMP_NUM_THREADS=1", "python", "examples/train_imagenet.py",
                                                      "--data", "DIGITS", *flags]),
              "torch_threads": env["OMP_NUM_THREADS"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{optimizer} x{factor:.4g} (base lr {default * factor:.4g}) seed {seed}: top-1 {result['top1']:.2f}%, "
          f"{seconds:.0f} s", flush=True)
    return result


def sweep(data: Path, optimizer: str, out: Path, max_widen: int = 2) -> list[dict]:
    """The grid, widened by a factor of 3 at an edge while the best sits there (at most ``max_widen`` times)."""
    factors = list(FACTORS)
    results = {f: run(data, optimizer, f, out) for f in factors}
    for _ in range(max_widen):
        best = max(factors, key=lambda f: results[f]["top1"])
        if best not in (factors[0], factors[-1]):
            break
        extra = best / 3 if best == factors[0] else best * 3
        factors = sorted([*factors, extra])
        results[extra] = run(data, optimizer, extra, out)
    return [results[f] for f in factors]


def table(rows_by_optimizer: dict[str, list[dict]], repeats: dict[str, dict]) -> str:
    lines = ["| optimizer | base lr (per 256) | x default | top-1 %, seed 0 | top-1 %, seeds "
             f"{', '.join(map(str, next(iter(repeats.values()))['seeds'])) if repeats else '-'} (mean) | wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, rows in rows_by_optimizer.items():
        best = max(r["top1"] for r in rows)
        for r in rows:
            mark = " (default)" if r["default"] else ""
            top1 = f"**{r['top1']:.1f}**" if r["top1"] == best else f"{r['top1']:.1f}"
            seeds = repeats.get(name, {}).get(r["factor"])
            seeds = f"{' / '.join(f'{t:.1f}' for t in seeds)} ({np.mean(seeds):.1f})" if seeds else ""
            lines.append(f"| {r['optimizer']}{mark} | {r['base_lr']:.4g} | {r['factor']:.3g} | {top1} | {seeds} | "
                         f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/fastlars-digits", help="where the PNGs are written (reused if there)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lr_defaults"), help="one JSON per run")
    p.add_argument("--optimizers", default="LARS,LAMB")
    p.add_argument("--seeds", default="1,2", help="more seeds for the default and the best lr of the seed-0 sweep "
                                                  "('' for none): the run-to-run spread")
    args = p.parse_args()
    data = write_digits(Path(args.data))
    out = Path(args.out)
    found = {name: sweep(data, name, out) for name in args.optimizers.split(",")}
    seeds = [int(s) for s in args.seeds.split(",") if s]
    summary, repeats = {}, {}
    for name, rows in found.items():
        best = max(rows, key=lambda r: r["top1"])
        default = next(r for r in rows if r["default"])
        summary[name] = {"default_top1": default["top1"], "best_top1": best["top1"], "best_factor": best["factor"],
                         "best_base_lr": best["base_lr"], "default_base_lr": default["base_lr"],
                         "best_minus_default": best["top1"] - default["top1"],
                         "within_2_points": best["top1"] - default["top1"] <= 2.0,
                         "best_interior": best is not rows[0] and best is not rows[-1]}
        if seeds:
            repeats[name] = {"seeds": [0, *seeds]}
            for r in {id(default): default, id(best): best}.values():
                repeats[name][r["factor"]] = [r["top1"]] + [run(data, name, r["factor"], out, seed)["top1"]
                                                            for seed in seeds]
            means = {f: float(np.mean(repeats[name][f])) for f in (default["factor"], best["factor"])}
            summary[name].update({"seeds": [0, *seeds], "default_top1_per_seed": repeats[name][default["factor"]],
                                  "best_top1_per_seed": repeats[name][best["factor"]],
                                  "best_minus_default_mean": means[best["factor"]] - means[default["factor"]]})
    (out / "summary.json").write_text(json.dumps({"data": "scikit-learn digits, 1437 train / 360 val, stratified "
                                                          "train_test_split(test_size=0.2, random_state=0)",
                                                  "run": RUN, "summary": summary}, indent=1) + "\n")
    print(table(found, repeats))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
