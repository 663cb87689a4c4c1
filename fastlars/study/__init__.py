"""The large-batch study: the seed papers' experiments at CPU scale.

    python -m fastlars.study [--quick] [--dataset mnist1d|digits] [--recipes ...] [--batches ...] [--out DIR]

For every recipe (naive SGD; Goyal's linear scaling + warmup; sqrt scaling; LARS; LAMB;
LARS + Ghost BN; Ghost BN + train longer; Smith's batch ramp; Yao's ABS and ABSA) and
every global batch size of a geometric sweep, a grid of learning rates times several
seeds is trained at once (an ensemble, :mod:`fastlars.study.ensemble`); the lr is chosen
on validation, and the study records steps to a target validation accuracy, test
accuracy at a fixed epoch budget, the top Hessian eigenvalue at the end and wall time,
plus McCandlish et al.'s B_simple along the small-batch run. Finished runs are cached in
``OUT/runs.json``: an interrupted study resumes where it stopped.
"""

from .core import DATASETS, MODELS, RECIPES, RunSpec, load_data, train_run
from .report import critical_batch, summarise

__all__ = ["DATASETS", "MODELS", "RECIPES", "RunSpec", "load_data", "train_run", "critical_batch", "summarise",
           "main"]


def main(argv=None) -> dict:
    from .cli import main as _main

    return _main(argv)
