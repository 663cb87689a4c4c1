"""The large-batch study: each seed paper's own claim at CPU scale, measured as Shallue et al.

    python -m fastlars.study [--quick | --full] [--report-only] [--workloads ...] [--out DIR]

Two workloads on MNIST-1D with batch norm (a small CNN and a 14-layer residual network).
For every tuned recipe (SGD with Nesterov momentum, LARS, LAMB, AdamW) and batch, a search
over lr x warm-up (x momentum with --full) on the search seeds chooses the point with the
fewest steps to the primary target (:mod:`fastlars.study.search`: the lr grid is extended
past any winning edge, so that every chosen lr is interior); the held-out report seeds then
train that point to the end of the budget, and every reported number comes from them. The
papers' prescriptions that are not searched (Goyal's linear rule with and without warm-up,
Hoffer's Ghost BN + longer regime, Smith's batch ramp, Yao's ABS/ABSA) run on the same
report seeds, so every comparison is paired (:mod:`fastlars.study.report`: bootstrap of
per-seed ratios or differences, a verdict per paper by a stated rule). Each round of a
search trains its points times its seeds at once (an ensemble, :mod:`fastlars.study.ensemble`).
Finished runs are cached in ``OUT/runs.json``: an interrupted study resumes where it stopped,
and ``--report-only`` rebuilds every output from it without the dataset.
"""

from .core import DATASETS, MODELS, RECIPES, RunSpec, load_data, train_run
from .report import summarise
from .stats import critical_batch, paired

__all__ = ["DATASETS", "MODELS", "RECIPES", "RunSpec", "load_data", "train_run", "critical_batch", "paired",
           "summarise", "main"]


def main(argv=None) -> dict:
    from .cli import main as _main

    return _main(argv)
