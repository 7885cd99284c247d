"""Runner entry point for ``python -m benchmarks.run --ops patchify``: see benchmarks/bench_rope_patchify.py."""

from benchmarks.bench_rope_patchify import run_patchify as run, smoke  # noqa: F401
