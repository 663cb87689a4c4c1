"""Benchmarks shipped with the package: ``python -m fastlars.bench e2e`` (end-to-end
ResNet-50 training throughput at large global batch)."""
