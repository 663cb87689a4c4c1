"""The large-batch study: the seed papers' experiments at CPU scale, measured as Shallue et al.

    python -m fastlars.study [--quick] [--report-only] [--recipes ...] [--batches ...] [--out DIR]

For every recipe (by default: SGD+momentum without warm-up, Goyal's SGD with warm-up, LARS,
LAMB; also sqrt scaling, LARS + Ghost BN, Ghost BN + train longer, Smith's batch ramp, Yao's
ABS and ABSA) and every global batch size of a geometric sweep, the study measures the
fewest steps to a target validation accuracy with the lr tuned per batch
(:mod:`fastlars.study.search`: the lr grid is extended past any winning edge, then refined,
so that every chosen lr is interior). Each round of a search trains its lrs times several
seeds at once (an ensemble, :mod:`fastlars.study.ensemble`). Cells whose recipe does the
same thing as another's at that batch share that cell's runs. The report gives the critical
batch by interpolation with its interval over seeds, McCandlish et al.'s B_simple, a
fixed-epoch view (test accuracy, top Hessian eigenvalue) and a verdict per paper by a
stated rule. Finished runs are cached in ``OUT/runs.json``: an interrupted study resumes
where it stopped, and ``--report-only`` rebuilds every output from it without the dataset.
"""

from .core import DATASETS, MODELS, RECIPES, RunSpec, load_data, train_run
from .report import critical_batch, summarise

__all__ = ["DATASETS", "MODELS", "RECIPES", "RunSpec", "load_data", "train_run", "critical_batch", "summarise",
           "main"]


def main(argv=None) -> dict:
    from .cli import main as _main

    return _main(argv)
