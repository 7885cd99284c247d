"""Block-sparse attention for video DiTs: patterns, the configuration and its calibration, the schedule.

    sparse = dit_fast.SparseAttention(pattern="sliding_tile", density=0.25, dense_steps=10)
    dit_fast.patch(pipe.transformer, sparse=sparse)              # Wan 2.1 / 2.2, HunyuanVideo
    model = DiTVideo(attention="block_sparse", sparse=sparse)    # dit_fast's own model, training too

patterns.py   sliding_tile / radial / topk -> SparseBlocks (dit_fast/ops/sparse_layout.py), each with a
              token-level predicate; the named registry PATTERNS
config.py     SparseAttention: pattern(s), density, dense steps and layers, tolerance, tile; the choices
              per grid, layer and head; save / load (JSON), the command line's spec
runtime.py    SparseRuntime: the step from the timestep, the calibration, the blocks cache; what an
              attention layer calls (dit_fast.ops.block_sparse_attention runs the blocks)
"""

from dit_fast.sparse.config import SparseAttention, SparseCalibrationError
from dit_fast.sparse.patterns import PATTERNS, radial, sliding_tile, topk
from dit_fast.sparse.runtime import SparseRuntime, StepTracker

__all__ = ["PATTERNS", "SparseAttention", "SparseCalibrationError", "SparseRuntime", "StepTracker", "radial",
           "sliding_tile", "topk"]
