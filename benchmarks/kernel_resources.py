"""What a Triton kernel costs before it runs: compile it for an H100 (sm_90a) on any machine, GPU or not.

Triton's compiler and its bundled ptxas / cuobjdump lower a kernel to SASS without a device. From the
result this prints, per variant: registers per thread, spilled bytes, shared memory, and counts of the
SASS instructions that decide speed: tensor-core matrix ops (HGMMA: Hopper's wgmma; HMMA: the older
mma.sync path), global loads by width (LDG.E.128 is a 16-byte vector; LDG.E.U16 one bf16 element),
local-memory traffic (LDL/STL: spills), special-function ops (MUFU: exp2, sin, cos, rcp) and integer
division sequences (I2F.U32.RP starts one). Static counts, not executed counts: an instruction inside
a loop counts once. Compare variants of one kernel with it; time them on a GPU.

    python -m benchmarks.kernel_resources                          # attention kernels, default variants
    python -m benchmarks.kernel_resources --head-dims 72 128 --kernels fwd --variants dense rope window
    python -m benchmarks.kernel_resources --head-dims 128 --variants tiled rope_tiled   # window_tile
    python -m benchmarks.kernel_resources --json out.json
    python -m benchmarks.kernel_resources --kernels fwd --head-dims 72 --chunks padded   # before the chunks
    python -m benchmarks.kernel_resources --kernels dkdv_atomic     # the one-pass backward (dq by atomics)
    python -m benchmarks.kernel_resources --rows fwd:72:dense:128,64,8,3 dkdv_atomic:128:dense:32,128,8,2
    python -m benchmarks.kernel_resources --head-dims 8 10 24 --kernels fwd dkdv dq   # small head dims

Each row compiles with the ALIGNED flag the launcher would give that head dim (16-byte rows in bf16:
D = 8, 24 yes; D = 10 no, so its loads are as wide as Triton proves from D and the strides: the
"ldg_narrow" / "ldg_total" columns), and the strides a (1, 16384, 16, D) launch marks divisible by 16.

Per row also: HGMMA by shape and their matrix work (sum of M * N * K), WARPGROUP.DEPBAR waits by the
number of wgmma groups left in flight, TMA loads and reduce-adds (UTMALDG, UTMAREDG), USETMAXREG (warp
specialization), RED / ATOM (global atomics), and the Triton version that compiled it.

Run without TRITON_INTERPRET (the script clears it for the compile).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter never lowers a kernel

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SASS_COUNTS = {
    "hgmma": r"\bHGMMA\b",
    "hmma": r"\bHMMA\b",
    "ldg128": r"\bLDG\.E\.128\b",
    "ldg64": r"\bLDG\.E\.64\b",
    "ldg_narrow": r"\bLDG\.E\.(U16|S16|U8|S8)\b",  # 1- and 2-byte loads (plain LDG.E is 4 bytes)
    "ldl_stl": r"\b(LDL|STL)\b",
    "mufu": r"\bMUFU\b",
    "int_div": r"\bI2F\.U32\.RP\b",
    "shfl": r"\bSHFL\b",
    # fp32 CUDA-core work beside the matrix units: the softmax's scale, rescale and exponent per score
    "fmul": r"\bFMUL\b",
    "ffma": r"\bFFMA\b",
    "fadd": r"\bFADD\b",
    # Hopper's asynchronous machinery: TMA tile loads and reduce-adds, warp-specialized register
    # reallocation (setmaxnreg), and global atomics (RED: no result, ATOM: with one)
    "utmaldg": r"\bUTMALDG\b",
    "utmaredg": r"\bUTMAREDG\b",
    "usetmaxreg": r"\bUSETMAXREG\b",
    "red": r"\bREDG?\b",
    "atom": r"\bATOMG?\b",
}


def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def _count(sass: str) -> Dict[str, object]:
    counts = {key: len(re.findall(pattern, sass)) for key, pattern in SASS_COUNTS.items()}
    counts["ldg_total"] = len(re.findall(r"\bLDG\b", sass))
    # wgmma by shape (M x N x K per instruction) and the matrix work they issue: sum of M * N * K over
    # the static instructions (a loop body counts once, like every count here)
    shapes = re.findall(r"\bHGMMA\.(\d+)x(\d+)x(\d+)", sass)
    counts["hgmma_shapes"] = {f"{m}x{n}x{k}": shapes.count((m, n, k)) for m, n, k in sorted(set(shapes))}
    counts["hgmma_work"] = sum(int(m) * int(n) * int(k) for m, n, k in shapes)
    # waits on outstanding wgmma groups, by how many may stay in flight (0: a full drain)
    depths = re.findall(r"\bWARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+|\d+)", sass)
    counts["depbar"] = {str(int(d, 0)): depths.count(d) for d in sorted(set(depths))}
    return counts


def resources(fn, signature: Dict[str, str], constexprs: Dict[str, object], num_warps: int, num_stages: int,
              divisible_by_16=()):
    """Compile fn for sm_90a and return registers, spills, shared memory and SASS counts.

    divisible_by_16: argument names to mark as multiples of 16, as a launch does for 16-byte aligned
    pointers and integers divisible by 16 (what lets Triton emit 16-byte vector loads)."""
    fn = triton.JITFunction(getattr(fn, "fn", fn)) if not isinstance(fn, triton.JITFunction) else fn
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    reqntid = re.search(r"\.reqntid\s+(\d+)", compiled.asm.get("ptx", ""))  # threads per block, fixed
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    local = re.search(r"LOCAL:(\d+)", res)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "local_bytes": int(local.group(1)) if local else None,
        "shared_bytes": compiled.metadata.shared,
        # a warp-specialized kernel runs more threads than num_warps says (its producer warpgroup)
        "threads": int(reqntid.group(1)) if reqntid else 32 * num_warps,
        "sass_lines": sass.count("\n"),
        **_count(sass),
    }


# ---------------------------------------------------------------------------------------------
# The attention kernels (triton_kernels/attention.py)
# ---------------------------------------------------------------------------------------------

VARIANTS = {  # flags of one masking mode
    "dense": dict(HAS_ROPE=False, HAS_MASK=False, WINDOW=False, TILED=False),
    "rope": dict(HAS_ROPE=True, HAS_MASK=False, WINDOW=False, TILED=False),
    "window": dict(HAS_ROPE=False, HAS_MASK=False, WINDOW=True, TILED=False),
    "padding": dict(HAS_ROPE=False, HAS_MASK=True, WINDOW=False, TILED=False),
    # window_tile: 3D-tile order, tiles of 4 x 8 x 8 (the benchmark's; the tile is a compile-time constant)
    "tiled": dict(HAS_ROPE=False, HAS_MASK=False, WINDOW=False, TILED=True, TILE_T=4, TILE_H=8, TILE_W=8),
    "rope_tiled": dict(HAS_ROPE=True, HAS_MASK=False, WINDOW=False, TILED=True, TILE_T=4, TILE_H=8, TILE_W=8),
}
TILE_ONE = dict(TILE_T=1, TILE_H=1, TILE_W=1)  # the tile of the variants that are not TILED


def attention_signature(fn, dtype: str) -> Dict[str, str]:
    """Triton signature of an attention kernel: pointers typed, integers i32, the scale fp32."""
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in ("LSE_ptr", "DELTA_ptr", "ROPE_ptr", "DQA_ptr"):
            sig[name] = "*fp32"
        elif name == "KPM_ptr":
            sig[name] = "*u8"
        elif name in ("STARTS_ptr", "COUNT_ptr", "INDEX_ptr", "VISITS_ptr"):  # the block-sparse index lists
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name == "sm_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def attention_aligned(kernel: str, head_dim: int) -> bool:
    """The ALIGNED flag the launchers give a bf16 launch at this head dim: the launchers' own check
    (triton_kernels/_layout.aligned_16) on fresh (B, S, heads, D) tensors, with the one-pass backward's
    fp32 dq sums beside them where its kernels address those (D = 8, 24: True; 10, 12: False)."""
    import torch

    from dit_fast.triton_kernels._layout import aligned_16

    tensors = [torch.empty(1, 2, 16, head_dim, dtype=torch.bfloat16)]
    if kernel in ("dkdv_atomic", "dq_convert"):
        tensors.append(torch.empty(1, 2, 16, head_dim, dtype=torch.float32))
    return aligned_16(tensors, head_dim)


def attention_divisible(fn, head_dim: int, heads: int = 16, seq_len: int = 16384) -> List[str]:
    """Arguments a launch at (B, S, heads, D) = (1, seq_len, heads, head_dim) marks divisible by 16."""
    values = {"D": head_dim, "HEADS": heads, "SQ": seq_len, "LQ": seq_len, "LK": seq_len}
    for p in fn.params:
        if p.name.startswith("stride_"):
            values[p.name] = {"b": seq_len * heads * head_dim, "s": heads * head_dim, "h": head_dim}[p.name[-1]]
    return [p.name for p in fn.params
            if not p.is_constexpr and (p.name.endswith("_ptr") or values.get(p.name, 1) % 16 == 0)]


def _import_triton_kernels():
    """dit_fast.triton_kernels, also where dit_fast is not installed (another venv's Triton with this
    checkout on PYTHONPATH): setup.py maps the package to triton_kernels/, which PYTHONPATH cannot."""
    import importlib
    import importlib.util

    try:
        return importlib.import_module("dit_fast.triton_kernels")
    except ModuleNotFoundError:
        import dit_fast

        root = Path(__file__).resolve().parent.parent / "triton_kernels"
        spec = importlib.util.spec_from_file_location("dit_fast.triton_kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        dit_fast.triton_kernels = module
        return module


# kernel name -> (function in triton_kernels/attention.py, flags of that kernel)
KERNELS = {
    "fwd": ("_attn_fwd_kernel", {}),
    "dkdv": ("_attn_bwd_dkdv_kernel", dict(DQ_ATOMIC=False)),
    "dkdv_atomic": ("_attn_bwd_dkdv_kernel", dict(DQ_ATOMIC=True)),  # the one-pass backward (dq by atomics)
    "dq": ("_attn_bwd_dq_kernel", {}),
    # the Hopper forward: TMA descriptors and, without a padding mask, the warp-specialized loop
    "fwd_tma": ("_attn_fwd_kernel", dict(TMA=True, WARP_SPECIALIZE=True)),
    "dq_convert": ("_attn_bwd_dq_convert_kernel", {}),  # the one-pass backward's epilogue
    # block-sparse attention (triton_kernels/attention_sparse.py): variants dense / padding; tiles of 4 x 8 x 8
    # tokens, partial ones at the edges (WHOLE_TILES False: every block masked at its tile's end, as on Wan)
    "sparse_fwd": ("attention_sparse._sparse_fwd_kernel", dict(TILE_V=256, WHOLE_TILES=False, RECORD=False)),
    "sparse_dkdv": ("attention_sparse._sparse_bwd_dkdv_kernel", dict(TILE_V=256, WHOLE_TILES=False, RECORD=False)),
    "sparse_dq": ("attention_sparse._sparse_bwd_dq_kernel", dict(TILE_V=256, WHOLE_TILES=False, RECORD=False)),
}


def attention_rows(kernels: List[str], head_dims: List[int], variants: List[str], configs,
                   chunks: str = "auto") -> List[dict]:
    """chunks: "auto" the head dim in the kernels' power-of-two chunks (head_chunks), "padded" one chunk
    padded to a power of two (the kernels before the chunks: the comparison), or "D0,D1"."""
    _import_triton_kernels()
    import importlib

    from dit_fast.triton_kernels import attention as A

    rows = []
    for kernel in kernels:
        name, kernel_flags = KERNELS[kernel]
        module, _, name = name.rpartition(".")  # "module.function": another file of the family
        fn = getattr(importlib.import_module(f"dit_fast.triton_kernels.{module}") if module else A, name)
        fn = triton.JITFunction(getattr(fn, "fn", fn)) if not isinstance(fn, triton.JITFunction) else fn
        params = {p.name for p in fn.params}
        for d in head_dims:
            if chunks == "auto":  # the launcher's choice (the one-pass backward halves a single chunk)
                d0, d1 = A.head_chunks(d, halves=kernel_flags.get("DQ_ATOMIC", False))
            elif chunks == "padded":
                d0, d1 = max(16, triton.next_power_of_2(d)), 0
            else:  # "D0,D1"
                d0, d1 = (int(x) for x in chunks.split(","))
            for variant in variants:
                for bm, bn, warps, stages in configs:
                    aligned = attention_aligned(kernel, d)
                    flags = dict(TILE_ONE, **VARIANTS[variant], **kernel_flags, BLOCK_M=bm, BLOCK_N=bn,
                                 ALIGNED=aligned, BLOCK_D0=d0, BLOCK_D1=d1, DOT_PRECISION="tf32", OFFS_64=False)
                    constexprs = {k: v for k, v in flags.items() if k in params}
                    if any(p.name == "D" and p.is_constexpr for p in fn.params):
                        constexprs["D"] = d
                    row = dict(kernel=kernel, head_dim=d, block_d0=d0, block_d1=d1, variant=variant, block_m=bm,
                               block_n=bn, num_warps=warps, num_stages=stages, aligned=aligned,
                               triton=triton.__version__)
                    if kernel == "fwd_tma" and not aligned:
                        row["error"] = "rows not 16-byte aligned: the launcher runs the pointer forward (fwd)"
                        rows.append(row)
                        print(_format(row), flush=True)
                        continue
                    try:
                        row.update(resources(fn, attention_signature(fn, "bf16"), constexprs, warps, stages,
                                             attention_divisible(fn, d)))
                    except Exception as exc:  # a configuration that does not compile says why
                        row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                    rows.append(row)
                    print(_format(row), flush=True)
    return rows


COLUMNS = ["kernel", "head_dim", "variant", "block_m", "block_n", "num_warps", "num_stages", "aligned", "threads",
           "regs", "local_bytes", "shared_bytes", "hgmma", "hgmma_work", "hgmma_shapes", "depbar", "hmma", "utmaldg",
           "utmaredg", "usetmaxreg", "red", "atom", "ldg128", "ldg64", "ldg_narrow", "ldg_total", "ldl_stl", "mufu",
           "int_div", "fmul", "ffma", "fadd", "sass_lines"]


def _format(row: dict) -> str:
    if "error" in row:
        return " ".join(str(row[c]) for c in COLUMNS[:7]) + "  ERROR " + row["error"]
    return " ".join(f"{c}={row.get(c)}".replace(" ", "") if isinstance(row.get(c), dict) else f"{c}={row.get(c)}"
                    for c in COLUMNS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", default=["fwd", "dkdv", "dq"], choices=sorted(KERNELS))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 72, 128])
    parser.add_argument("--variants", nargs="+", default=["dense", "rope", "window"], choices=sorted(VARIANTS))
    parser.add_argument("--configs", nargs="+", default=["128,64,8,3", "64,64,4,3"],
                        help="BLOCK_M,BLOCK_N,num_warps,num_stages")
    parser.add_argument("--chunks", default="auto",
                        help="head dim in the kernels' power-of-two chunks (auto), padded to one power of two "
                             "(padded), or given chunks BLOCK_D0,BLOCK_D1")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--rows", nargs="+", metavar="KERNEL:D:VARIANT:BM,BN,W,S",
                        help="exactly these rows (one compile each) instead of the cross product above")
    args = parser.parse_args(argv)
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    if args.rows:
        rows = []
        for spec in args.rows:
            kernel, d, variant, config = spec.split(":")
            rows += attention_rows([kernel], [int(d)], [variant], [tuple(int(x) for x in config.split(","))],
                                   args.chunks)
    else:
        rows = attention_rows(args.kernels, args.head_dims, args.variants, configs, args.chunks)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
