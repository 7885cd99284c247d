"""Bar plots of speed-up vs each baseline, one PNG per results file, saved next to it.

    python -m benchmarks.plot [--results-dir benchmarks/results] [--device SLUG] [--run-id ID]

For benchmarks/results/<slug>/<family>.jsonl it draws, for the rows of one run (the latest in the
file unless --run-id is given), one bar per (op, variant, shape) and per (ours provider, baseline):
baseline_ms / ours_ms, so a bar above the line at 1 means ours is faster. Output:
benchmarks/results/<slug>/<family>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common


def _rows_of_run(rows: List[dict], run_id: Optional[str]) -> List[dict]:
    if not rows:
        return []
    if run_id is None or not any(r.get("run_id") == run_id for r in rows):
        run_id = max(r.get("run_id", "") for r in rows)
    return [r for r in rows if r.get("run_id") == run_id]


def plot_file(path: Path, run_id: Optional[str] = None) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows_of_run(common.read_rows(path), run_id)
    groups = common.group_rows(rows)
    labels, series = [], {}
    for (op, variant, shape, dtype), by in groups.items():
        ours = [p for p in by if p.startswith("ours-")]
        baselines = [p for p in by if not p.startswith("ours-")]
        if not ours or not baselines:
            continue
        label = f"{op} {variant}\n{common.shape_str(json.loads(shape))} {dtype}"
        labels.append(label)
        for o in ours:
            for b in baselines:
                series.setdefault(f"{o} vs {b}", {})[label] = by[b]["median_ms"] / by[o]["median_ms"]
    if not labels:
        return None
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(series)) * 0.5 + 3), 5))
    for i, (name, values) in enumerate(sorted(series.items())):
        xs = [j + i * width for j, lab in enumerate(labels) if lab in values]
        ax.bar(xs, [values[lab] for lab in labels if lab in values], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up (baseline time / ours)")
    r0 = rows[0]
    ax.set_title(f"{path.stem} on {r0['device']} (torch {r0['torch']}, triton {r0['triton']}, "
                 f"{str(r0['git_commit'])[:10]}, run {r0['run_id']})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_device(slug_dir: Path, run_id: Optional[str] = None) -> List[Path]:
    outs = []
    for path in sorted(Path(slug_dir).glob("*.jsonl")):
        if path.stem == "copy":
            continue
        out = plot_file(path, run_id)
        if out is not None:
            outs.append(out)
    return outs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--device", default=None, help="device slug folder (default: every folder)")
    parser.add_argument("--run-id", default=None, help="default: the latest run in each file")
    args = parser.parse_args(argv)
    root = Path(args.results_dir)
    slugs = [root / args.device] if args.device else sorted(p for p in root.iterdir() if p.is_dir())
    for slug_dir in slugs:
        for out in plot_device(slug_dir, args.run_id):
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
