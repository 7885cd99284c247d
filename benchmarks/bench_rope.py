"""Runner entry point for ``python -m benchmarks.run --ops rope``: see benchmarks/bench_rope_patchify.py."""

from benchmarks.bench_rope_patchify import run_rope as run, smoke  # noqa: F401
