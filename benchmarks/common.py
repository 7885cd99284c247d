"""Shared benchmark helpers: timing with quantiles, peak memory, JSON-lines rows, ratio tables.

Every benchmark module (benchmarks/bench_<op>.py) follows the same shape (Triton tutorials, Liger):

    def setup(provider, case) -> fn        # builds inputs on the device; fn() runs the timed work
    def run(device, quick) -> list[dict]   # the runner's entry point: times every case, writes rows
    def smoke() -> None                    # optional: tiny CPU correctness check the runner calls on CPU

API (small on purpose; everything else in this file is private):

    time_fn(fn, device, *, warmup_ms=25, rep_ms=100, flush_l2=True, grad_to_none=()) -> Timing
        CUDA: one pair of CUDA events per repetition, the L2 cache flushed (a 256 MB buffer zeroed)
        before each, grads reset outside the timed region; median and 20/80 % quantiles.
        CPU: the same with time.perf_counter (labelled by the row's device, never mixed with GPU rows).
    time_fns({name: (fn, grad_to_none)}, device, *, rep_ms=100) -> {name: Timing}
        several providers of one case; on CPU interleaved call by call (ratios that hold under load).
    peak_memory(fn, device, grad_to_none=()) -> int | None
        bytes allocated during one call above what was allocated before it (outputs + temporaries),
        from torch.cuda.max_memory_allocated; None on CPU.
    gbps(nbytes, ms), tflops(flops, ms)
    measure_copy_bandwidth(device, nbytes=2**30) -> dict
        a device-to-device copy_ of a large buffer, counted as bytes read + bytes written; the
        ceiling that memory-bound ops are judged against ("% of measured copy bandwidth").
    make_row(op, variant, provider, shape, dtype, timing, *, nbytes=None, flops=None,
             peak_mem_bytes=None, device, **extra) -> dict
    write_rows(rows, op) -> Path
        appends JSON lines to benchmarks/results/<device-slug>/<op>.jsonl (or under
        $DIT_FAST_RESULTS_DIR); every row carries the device name, torch/triton/CUDA versions,
        git commit, timestamp, run id and command line.
    print_ratio_table(rows, metric="gbps")
        ours (providers named "ours-*") vs each baseline side by side: baseline_ms / ours_ms,
        with ours' time, GB/s (or "tflops") and peak memory.
    require_cuda(device) -> bool
        False (after printing "GPU numbers need a CUDA GPU") when a CUDA device was asked for
        but none is present.
    out_of_time() -> bool
        True once the runner's --budget-s deadline has passed; modules check it between cases.

Providers are named: "ours-triton", "ours-cuda", "ours-torch" (our reference path), "eager",
"compile", "sdpa", "flex", "galore-torch", ... Variants: "fwd", "bwd", "fwd+bwd".
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(os.environ.get("DIT_FAST_RESULTS_DIR", REPO_ROOT / "benchmarks" / "results"))
GPU_MESSAGE = "GPU numbers need a CUDA GPU"
L2_FLUSH_BYTES = 256 * 1024 * 1024  # > 5x the H100's 50 MB L2 and the H200's 60 MB
QUANTILES = (0.2, 0.5, 0.8)

# Set by benchmarks/run.py: one id for every row of one invocation, the command line, a deadline.
RUN_ID = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _command_line() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"-m {spec.name}" if spec is not None and spec.name else (sys.argv[0] if sys.argv else "")
    if "pytest" in program:
        program = "-m pytest"
    return " ".join(["python", program] + sys.argv[1:])


COMMAND = _command_line()
DEADLINE: Optional[float] = None  # time.monotonic() value


def out_of_time() -> bool:
    return DEADLINE is not None and time.monotonic() > DEADLINE


def require_cuda(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{GPU_MESSAGE}: torch {torch.__version__} sees no CUDA device here. "
              "Pass --device cpu for CPU numbers of the PyTorch paths.")
        return False
    return True


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantile(sorted_times: Sequence[float], q: float) -> float:
    # linear interpolation between closest ranks, like torch.quantile
    pos = q * (len(sorted_times) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_times) - 1)
    return sorted_times[lo] + (sorted_times[hi] - sorted_times[lo]) * (pos - lo)


def _summarise(times_ms: List[float]) -> Timing:
    s = sorted(times_ms)
    return Timing(median_ms=statistics.median(s), p20_ms=_quantile(s, 0.2), p80_ms=_quantile(s, 0.8), reps=len(s))


_flush_buffers: Dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    return _flush_buffers[device]


def _reset_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_fn(fn: Callable[[], object], device, *, warmup_ms: float = 25, rep_ms: float = 100,
            min_reps: int = 10, max_reps: int = 1000, flush_l2: bool = True,
            grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    """Median and 20/80 % quantiles of ``fn()`` in milliseconds (see the module docstring)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _time_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps, grad_to_none)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cache = _flush_buffer(device) if flush_l2 else None

    def one():
        _reset_grads(grad_to_none)
        if cache is not None:
            cache.zero_()
        fn()

    one()  # compile / autotune / allocate outside the estimate
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        one()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 5, 1e-3)  # includes the flush: errs on fewer reps
    for _ in range(max(1, int(warmup_ms / estimate))):
        one()
    reps = max(min_reps, min(max_reps, int(rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        _reset_grads(grad_to_none)
        if cache is not None:
            cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summarise([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_fns(fns: Dict[str, Tuple[Callable[[], object], Sequence[torch.Tensor]]], device, *,
             rep_ms: float = 100, min_reps: int = 10) -> Dict[str, Timing]:
    """``time_fn`` for several providers of one case: {name: (fn, grad_to_none)} -> {name: Timing}.

    CUDA: one provider after the other (the events time the device alone). CPU: interleaved, one call of
    each provider per round in a rotating order, so a burst of load from another process falls on all of
    them alike and the ratios between them hold even on a busy machine; ``rep_ms`` per provider.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {name: time_fn(fn, device, rep_ms=rep_ms, min_reps=min_reps, grad_to_none=grads)
                for name, (fn, grads) in fns.items()}
    names = list(fns)
    estimate_ms = {}
    for name in names:  # warm-up: one call, then one timed call for the estimate
        fn, grads = fns[name]
        for _ in range(2):
            _reset_grads(grads)
            t0 = time.perf_counter()
            fn()
            estimate_ms[name] = max((time.perf_counter() - t0) * 1e3, 1e-3)
    reps = max(min_reps, min(1000, int(rep_ms / max(estimate_ms.values()))))
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, grads = fns[name]
            _reset_grads(grads)
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _summarise(ts) for name, ts in times.items()}


def _time_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps, grad_to_none) -> Timing:
    _reset_grads(grad_to_none)
    t0 = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        _reset_grads(grad_to_none)
        fn()
    reps = max(min_reps, min(max_reps, int(rep_ms / estimate_ms)))
    times = []
    for _ in range(reps):
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summarise(times)


def peak_memory(fn: Callable[[], object], device, grad_to_none: Sequence[torch.Tensor] = ()) -> Optional[int]:
    """Bytes allocated during one ``fn()`` above what was allocated before it; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    _reset_grads(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    _reset_grads(grad_to_none)
    return int(peak)


def gbps(nbytes: Optional[float], ms: float) -> Optional[float]:
    return None if nbytes is None or ms <= 0 else nbytes / (ms * 1e-3) / 1e9


def tflops(flops: Optional[float], ms: float) -> Optional[float]:
    return None if flops is None or ms <= 0 else flops / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------
# Environment and rows
# ---------------------------------------------------------------------------------------------


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_slug(device) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"; every CPU -> "cpu"."""
    if torch.device(device).type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


_env_cache: Dict[str, dict] = {}


def env_info(device) -> dict:
    """Device name, versions and git commit (from git, else $DIT_FAST_COMMIT, else "unknown")."""
    key = str(device)
    if key not in _env_cache:
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        commit = _git("rev-parse", "HEAD")
        dirty = None
        if commit is not None:
            dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
        else:
            commit = os.environ.get("DIT_FAST_COMMIT", "unknown")
        _env_cache[key] = {
            "device": device_name(device),
            "device_slug": device_slug(device),
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "git_commit": commit,
            "git_dirty": dirty,
        }
    return _env_cache[key]


def make_row(op: str, variant: str, provider: str, shape, dtype, timing: Timing, *, device,
             nbytes: Optional[float] = None, flops: Optional[float] = None,
             peak_mem_bytes: Optional[int] = None, **extra) -> dict:
    """One result row. ``shape`` is a dict ({"B": 2, "N": 32760, "C": 1152}) or a list."""
    row = {
        "op": op,
        "variant": variant,
        "provider": provider,
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "reps": timing.reps,
        "bytes": nbytes,
        "gbps": gbps(nbytes, timing.median_ms),
        "flops": flops,
        "tflops": tflops(flops, timing.median_ms),
        "peak_mem_bytes": peak_mem_bytes,
    }
    row.update(extra)
    row.update(env_info(device))
    if torch.device(device).type != "cuda" and hasattr(os, "getloadavg"):
        row["loadavg_1m"] = round(os.getloadavg()[0], 2)  # CPU timings mean little on a busy machine
    row.update({
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_id": RUN_ID,
        "command": COMMAND,
    })
    return row


def results_path(op: str, slug: str, root: Optional[Path] = None) -> Path:
    return Path(root or RESULTS_DIR) / slug / f"{op}.jsonl"


def write_rows(rows: Sequence[dict], op: str, root: Optional[Path] = None) -> Optional[Path]:
    """Appends ``rows`` (all of one device) to <root>/<device-slug>/<op>.jsonl; returns the path."""
    if not rows:
        return None
    path = results_path(op, rows[0]["device_slug"], root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")
    return path


def read_rows(path) -> List[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def measure_copy_bandwidth(device, nbytes: int = 1 << 30, *, write: bool = True) -> dict:
    """Device-to-device ``dst.copy_(src)`` of ``nbytes``; bytes counted = read + written.

    The row (op "copy", provider "torch") is written to <slug>/copy.jsonl unless write=False.
    """
    src = torch.randn(nbytes // 4, device=device).view(torch.uint8)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, flush_l2=False)  # 1 GiB is far beyond any L2
    row = make_row("copy", "fwd", "torch", {"bytes": nbytes}, torch.uint8, timing, device=device,
                   nbytes=2 * nbytes)
    del src, dst
    if write:
        write_rows([row], "copy")
    return row


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def shape_str(shape) -> str:
    if isinstance(shape, dict):
        return " ".join(f"{k}={v}" for k, v in shape.items())
    return "x".join(str(s) for s in shape)


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(h)), *(len(str(l[i])) for l in lines)) if lines else len(str(h))
              for i, h in enumerate(header)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for l in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(l, widths)))


def group_rows(rows: Sequence[dict]) -> Dict[tuple, Dict[str, dict]]:
    """{(op, variant, shape, dtype): {provider: row}}; later rows win."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        key = (r["op"], r["variant"], json.dumps(r["shape"]), r["dtype"])
        groups.setdefault(key, {})[r["provider"]] = r
    return groups


def print_ratio_table(rows: Sequence[dict], metric: str = "gbps") -> None:
    """One line per (op, variant, shape, ours-provider): its time, ``metric`` and baseline_ms / ours_ms."""
    groups = group_rows(rows)
    baselines = sorted({p for g in groups.values() for p in g if not p.startswith("ours-")})
    unit = {"gbps": "GB/s", "tflops": "TFLOP/s"}.get(metric, metric)
    header = ["op", "variant", "shape", "dtype", "provider", "ms", unit, "peak MiB"] + [f"vs {b}" for b in baselines]
    lines = []
    for (op, variant, shape, dtype), by_provider in groups.items():
        ours = [p for p in by_provider if p.startswith("ours-")] or list(by_provider)[:1]
        for p in ours:
            r = by_provider[p]
            ratios = []
            for b in baselines:
                base = by_provider.get(b)
                ratios.append("-" if base is None or b == p else f"{base['median_ms'] / r['median_ms']:.2f}x")
            lines.append([op, variant, shape_str(json.loads(shape)), dtype, p, _fmt(r["median_ms"], ".4f"),
                          _fmt(r.get(metric), ".1f"),
                          _fmt(None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20, ".0f")] + ratios)
    print_table(header, lines)
