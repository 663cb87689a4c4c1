"""The benchmarks, a package run from the repository root: ``python -m bench.optim_step``,
``python -m bench.ghost_bn``, ``python -m bench.distributed_step``, ``python -m bench.host_overhead``
(the Makefile's bench-* targets), and ``bench/gpu_check.sh``. They import each other as
``bench.<module>``."""
