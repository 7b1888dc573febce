"""Benchmarks for lipjax: ``python -m benchmarks.run [--quick]``."""
