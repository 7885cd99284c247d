"""The attention kernels compiled for an H100/H200 (sm_90a) on this machine, no GPU needed.

benchmarks/kernel_resources.py compiles each kernel variant with Triton's own compiler and counts its
SASS. These tests read those counts: the 16-byte loads at D = 72, the head dim in power-of-two chunks
(D = 72 issues 80/128 of D = 128's wgmma work per score, no 128-wide head-dim product), the one-pass
backward's atomic adds, the TMA forward's warp specialization, and no spills in the configurations the
tuner is given for each. One subprocess per Triton version compiles every row (a clean process without
TRITON_INTERPRET: the interpreter patches triton.language in-process). The GPU machines run Triton 3.6:
the same rows compile there too when a Python with Triton 3.6 is given ($DIT_FAST_TRITON36_PYTHON; .ci/run
builds that venv).
"""

import os
import shutil
from pathlib import Path

import pytest

from tests.utils import compile_in_subprocess

pytest.importorskip("triton.compiler")

# KERNEL:D:VARIANT:BLOCK_M,BLOCK_N,num_warps,num_stages (benchmarks/kernel_resources.py --rows)
ROWS = [
    "fwd:72:dense:128,64,8,3",  # D = 72 in chunks 64 + 16; its loads
    "fwd:128:dense:128,128,8,2",  # the quick space's forward tile; D = 128's wgmma work
    "dkdv:128:dense:32,128,8,2",  # the quick space's dk/dv tile
    "dkdv_atomic:128:dense:32,128,8,2",  # the one-pass backward (dq by atomic adds)
    "dkdv_atomic:72:dense:32,128,8,2",
    "fwd_tma:128:dense:128,128,4,2",  # the Hopper forward: TMA + warp specialization
]
# head dims below 16 and not multiples of 8 (one 16-column chunk): 8 and 24 have 16-byte bf16 rows, 10 not
ROWS_SMALL = ["fwd:8:dense:128,64,8,3", "fwd:24:dense:128,64,8,3", "fwd:10:dense:128,64,8,3",
              "dkdv:10:dense:32,128,8,2", "dq:10:dense:64,64,4,3", "dkdv_atomic:10:dense:32,128,8,2",
              "dq_convert:10:rope:64,64,4,1", "fwd_tma:8:dense:128,128,4,2"]
ROWS_36 = ["dkdv_atomic:128:dense:32,128,8,2", "fwd_tma:128:dense:128,128,4,2", "dq_convert:72:rope:64,64,4,1",
           "fwd:10:dense:128,64,8,3", "dkdv:24:dense:32,128,8,2", "dq:8:dense:64,64,4,3"]


def _key(spec):
    kernel, d, _, config = spec.split(":")
    return (kernel, int(d), *(int(x) for x in config.split(",")))


def _rows(rows):
    return {(r["kernel"], r["head_dim"], r["block_m"], r["block_n"], r["num_warps"], r["num_stages"]): r
            for r in rows}


def _triton36_python():
    """$DIT_FAST_TRITON36_PYTHON (.ci/run makes that venv), None when unset; a set path that does not
    exist fails the test rather than skipping it."""
    path = os.environ.get("DIT_FAST_TRITON36_PYTHON")
    if not path:
        return None
    assert Path(path).exists() or shutil.which(path), f"DIT_FAST_TRITON36_PYTHON={path!r} does not exist"
    return path


@pytest.fixture(scope="module")
def compiled():
    rows = _rows(compile_in_subprocess(["--rows", *ROWS, *ROWS_SMALL]))
    for row in rows.values():
        assert "error" not in row, row
    return rows


@pytest.fixture(scope="module")
def compiled_36():
    python = _triton36_python()
    if python is None:
        pytest.skip("needs a Python with Triton 3.6 (the GPU machines' version): set DIT_FAST_TRITON36_PYTHON")
    rows = _rows(compile_in_subprocess(["--rows", *ROWS_36], python=python))
    for row in rows.values():
        assert "error" not in row, row
        assert row["triton"].startswith("3.6"), row["triton"]
    return rows


def _no_spills(row):
    assert row["ldl_stl"] == 0 and row["local_bytes"] == 0, f"{row['kernel']} D={row['head_dim']} spills: {row}"


def test_head_dim_72_in_chunks_issues_80_of_128(compiled):
    """D = 72 = 64 + 16 (the last 8 masked) instead of padded to 128: per score, the forward's wgmma work
    (sum of M x N x K over its HGMMA) is at most 80/128 of D = 128's, and no product is 128 wide in the
    head dim (QK^T's N is the key tile, 64 here; P V's N is the chunk, 64 and 16). Its tiles still load
    16 bytes at a time (the ALIGNED hint: a head stride of 72 hides the alignment from Triton)."""
    d72, d128 = compiled[_key(ROWS[0])], compiled[_key(ROWS[1])]
    per_score_72 = d72["hgmma_work"] / (d72["block_m"] * d72["block_n"])
    per_score_128 = d128["hgmma_work"] / (d128["block_m"] * d128["block_n"])
    assert per_score_72 <= 80 / 128 * per_score_128, (per_score_72, per_score_128)
    assert not any(shape.split("x")[1] == "128" for shape in d72["hgmma_shapes"]), d72["hgmma_shapes"]
    assert d72["ldg128"] > 0 and d72["ldg_narrow"] == 0 and d72["hmma"] == 0, d72
    _no_spills(d72)


def test_quick_space_tiles_compile_without_spills(compiled):
    """The quick space holds configurations chosen for one kernel each, on their sm_90a report: the
    forward's 128 x 128 tile halves its rescale work per score; the dk/dv kernel's two fp32 (BLOCK_N, D)
    accumulators spill at 128 x 64 and 64 x 64 (D = 128), so 32 x 128 is there. Each must compile
    without spills, or the measured kernel is the spilled one."""
    from dit_fast.triton_kernels.attention import QUICK_SPACE

    for spec in ROWS[1:3]:
        assert _key(spec)[2:] in QUICK_SPACE
        _no_spills(compiled[_key(spec)])


def test_one_pass_backward_adds_dq_atomically_without_spills(compiled):
    """The one-pass backward adds each tile pair's dq share with fp32 atomic reductions (REDG), computes
    it transposed so a 32-query tile still runs on wgmma (no mma.sync at D = 128), and fits its 32 x 128
    tile (the quick space's) in registers at D = 128 (two 64-column halves) and 72."""
    from dit_fast.triton_kernels.attention import QUICK_SPACE

    for spec in ROWS[3:5]:
        row = compiled[_key(spec)]
        assert _key(spec)[2:] in QUICK_SPACE
        assert row["red"] > 0 and row["hgmma"] > 0, row
        _no_spills(row)
    assert compiled[_key(ROWS[3])]["hmma"] == 0


def _assert_warp_specialized_tma(row):
    assert row["threads"] == 3 * 128, f"not warp-specialized (a producer and two consumer warpgroups): {row}"
    assert row["utmaldg"] > 0, f"no TMA loads: {row}"
    assert row["usetmaxreg"] > 0, f"no warp specialization (setmaxnreg): {row}"
    assert row["hgmma"] > 0 and row["hmma"] == 0, row
    _no_spills(row)


def test_tma_forward_is_warp_specialized(compiled):
    """D = 128, 128 x 128 tiles, 4 warps: every tile loaded by TMA (UTMALDG) from device-side descriptors,
    a producer warpgroup beside two consumer ones (384 threads; USETMAXREG: their register split),
    wgmma, no spills."""
    _assert_warp_specialized_tma(compiled[_key(ROWS[5])])


def test_triton_36_compiles_the_new_paths(compiled_36):
    """The GPU machines' Triton (3.6): the one-pass backward and the TMA forward as above (and the
    backward's dq convert kernel compiles, with RoPE)."""
    atomic, tma = compiled_36[_key(ROWS_36[0])], compiled_36[_key(ROWS_36[1])]
    assert atomic["red"] > 0 and atomic["hmma"] == 0, atomic
    _no_spills(atomic)
    _assert_warp_specialized_tma(tma)


def _assert_small_head_dim(row):
    """No spills; 16-byte vector loads exactly where the rows are 16-byte aligned (the ALIGNED promise
    the launcher gives: a wrong one would make the GPU load misaligned vectors, which the interpreter
    cannot show)."""
    _no_spills(row)
    assert row["aligned"] == (row["head_dim"] * 2 % 16 == 0), row
    if row["aligned"]:
        assert row["ldg128"] > 0, row
    else:
        assert row["ldg128"] == 0, row


def test_small_and_unaligned_head_dims_compile_without_spills(compiled):
    """Issue 17: every head dim 1..256 runs on the kernels. D = 8 and 24 (16- and 48-byte bf16 rows) load
    16 bytes at a time and D = 8 takes the warp-specialized TMA forward; D = 10 (20-byte rows) gets no
    ALIGNED hint and loads at the widths Triton proves itself (2 bytes here; the fp32 dq sums 8); no
    kernel spills, forward, both backwards and the one-pass backward's convert kernel."""
    for spec in ROWS_SMALL:
        row = compiled[_key(spec)]
        if row["kernel"] == "fwd_tma":
            _assert_warp_specialized_tma(row)
        else:
            _assert_small_head_dim(row)
    assert compiled[_key("fwd:8:dense:128,64,8,3")]["ldg_narrow"] == 0
    assert compiled[_key("fwd:24:dense:128,64,8,3")]["ldg_narrow"] == 0


def test_triton_36_compiles_small_head_dims(compiled_36):
    """The same on the GPU machines' Triton (3.6), forward and both backward kernels."""
    for spec in ROWS_36[3:]:
        _assert_small_head_dim(compiled_36[_key(spec)])
