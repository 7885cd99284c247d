"""Benchmark runner: runs every benchmarks/bench_<op>.py that exists, writes rows, optionally plots.

    python -m benchmarks.run [--ops adaln,attention,rope,patchify,galore,model] [--quick] [--plot]
                             [--device cuda|cpu] [--budget-s SECONDS] [--results-dir DIR]
    python -m benchmarks.run --merge DIR_OR_TARBALL   # fold rows that came back from a GPU machine
                                                     # into benchmarks/results/<device>/, deduplicated

Each op maps to the module ``benchmarks.bench_<op>`` and its ``run(device, quick) -> rows``
(see benchmarks/common.py). A missing module is reported as "missing", one that raises as
"FAILED" with its traceback; neither stops the others. Exit status: 0 unless a module failed.
On a machine without a CUDA GPU (and no --device cpu) it prints "GPU numbers need a CUDA GPU",
runs each module's tiny CPU ``smoke()`` where one exists, and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common

ALL_OPS = ("adaln", "attention", "rope", "patchify", "galore", "model")


def _import(op: str):
    """(module, None) or (None, "missing") or (None, "FAILED: ...")."""
    name = f"benchmarks.bench_{op}"
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None, "missing"
        traceback.print_exc()
        return None, f"FAILED to import: {exc}"
    except Exception as exc:  # a broken module is reported, the others still run
        traceback.print_exc()
        return None, f"FAILED to import: {type(exc).__name__}: {exc}"


def _run_module(module, device: str, quick: bool) -> List[dict]:
    if hasattr(module, "run"):
        rows = module.run(device=device, quick=quick)
        return list(rows or [])
    if hasattr(module, "main"):  # a module with only a command line
        module.main(["--device", device] + (["--quick"] if quick else []))
        return []
    raise AttributeError(f"{module.__name__} has neither run(device, quick) nor main(argv)")


def run_ops(ops, device: str, quick: bool, budget_s: Optional[float]) -> int:
    start = time.monotonic()
    if budget_s:
        common.DEADLINE = start + budget_s
    summary, failed = [], False
    for op in ops:
        if common.out_of_time():
            summary.append([op, "skipped: time budget spent", "-", "-"])
            continue
        t0 = time.monotonic()
        print(f"\n===== {op} =====", flush=True)
        module, problem = _import(op)
        if module is None:
            failed |= problem.startswith("FAILED")
            summary.append([op, problem, "-", f"{time.monotonic() - t0:.0f}"])
            continue
        try:
            rows = _run_module(module, device, quick)
            status = "ok"
        except Exception as exc:
            traceback.print_exc()
            failed, rows, status = True, [], f"FAILED: {type(exc).__name__}: {exc}"[:120]
        summary.append([op, status, str(len(rows)), f"{time.monotonic() - t0:.0f}"])
        sys.stdout.flush()
    print(f"\n===== summary (run {common.RUN_ID}, {time.monotonic() - start:.0f} s) =====")
    common.print_table(["op", "status", "rows", "seconds"], summary)
    return 1 if failed else 0


def cpu_smoke(ops) -> None:
    for op in ops:
        module, problem = _import(op)
        if module is None:
            print(f"[{op}] {problem}")
            continue
        if not hasattr(module, "smoke"):
            print(f"[{op}] no CPU smoke check")
            continue
        try:
            module.smoke()
        except Exception as exc:
            traceback.print_exc()
            print(f"[{op}] smoke FAILED: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# --merge: rows from a GPU machine's $OUT (folder or tarball of <device-slug>/<op>.jsonl)
# ---------------------------------------------------------------------------------------------


def _row_key(row: dict) -> str:
    keys = ("run_id", "timestamp", "op", "variant", "provider", "shape", "dtype", "device", "median_ms")
    return json.dumps([row.get(k) for k in keys], sort_keys=True)


def merge(source: Path, dest: Path) -> int:
    """Appends rows of source/<slug>/<op>.jsonl missing from dest/<slug>/<op>.jsonl; returns how many."""
    tmp = None
    if source.is_file():
        tmp = Path(tempfile.mkdtemp(prefix="dit_fast_merge_"))
        with tarfile.open(source) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links and absolute paths
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)
        source = tmp
    added = 0
    try:
        for src in sorted(source.rglob("*.jsonl")):
            slug = src.parent.name
            target = dest / slug / src.name
            have = {_row_key(r) for r in common.read_rows(target)} if target.exists() else set()
            new = [r for r in common.read_rows(src) if _row_key(r) not in have]
            if new:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "a") as f:
                    for r in new:
                        f.write(json.dumps(r) + "\n")
            print(f"{src.relative_to(source)}: {len(new)} new rows -> {target}")
            added += len(new)
            for png in src.parent.glob("*.png"):
                shutil.copy2(png, target.parent / png.name)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return added


def main(argv=None) -> int:
    # `dit-fast bench ARGS` runs this file and names itself in the environment, so its usage says so
    prog = os.environ.get("DIT_FAST_BENCH_PROG") or "python -m benchmarks.run"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma list from {','.join(ALL_OPS)}")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--plot", action="store_true", help="draw ratio bars next to the results (matplotlib)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (CPU numbers of the PyTorch paths)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases after this many seconds (rows so far are kept)")
    parser.add_argument("--results-dir", default=None, help="where rows go (default benchmarks/results)")
    parser.add_argument("--merge", default=None, metavar="DIR_OR_TAR",
                        help="merge rows from a folder or .tar.gz of <device>/<op>.jsonl into the results dir")
    args = parser.parse_args(argv)
    if args.results_dir:
        common.RESULTS_DIR = Path(args.results_dir)
    if args.merge:
        n = merge(Path(args.merge), common.RESULTS_DIR)
        print(f"merged {n} rows into {common.RESULTS_DIR}")
        return 0
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in ALL_OPS]
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {ALL_OPS}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"{common.GPU_MESSAGE} (torch {torch.__version__} sees none here); running the CPU smoke checks only.")
        cpu_smoke(ops)
        return 0
    status = run_ops(ops, args.device, args.quick, args.budget_s)
    if args.plot:
        try:
            from benchmarks import plot

            for path in plot.plot_device(common.RESULTS_DIR / common.device_slug(args.device), run_id=common.RUN_ID):
                print(f"plot: {path}")
        except Exception as exc:  # a plot is a convenience: never fail the run over it
            traceback.print_exc()
            print(f"plot FAILED: {type(exc).__name__}: {exc}")
    return status


if __name__ == "__main__":
    sys.exit(main())
