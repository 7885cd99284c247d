"""Sampling under torch.inference_mode, then training in the same process: the caches the first calls fill
(RoPE tables, tile permutations, tile starts, a sparse layer's blocks) hold ordinary tensors, which autograd
may save. Each case uses a grid or head dim no other test uses, so its cache entry is built here, under
inference_mode."""

import torch

from dit_fast import ops
from dit_fast.ops.sparse_layout import TileLayout
from dit_fast.sparse import SparseAttention, sliding_tile
from tests.test_sparse_models import dit_inputs, tiny_dit


def _infer_then_train(fn, *shape):
    with torch.inference_mode():
        fn(*(torch.randn(shape) for _ in range(3)))
    leaves = [torch.randn(shape, requires_grad=True) for _ in range(3)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_rope_tables_built_under_inference_mode_serve_training():
    _infer_then_train(lambda q, k, v: ops.apply_rope_3d(q, (3, 5, 7)), 1, 105, 2, 28)


def test_kernel_rope_table_built_under_inference_mode_serves_training():
    _infer_then_train(lambda q, k, v: ops.spacetime_attention(q, k, v, (3, 5, 7), mode="full", rope="3d",
                                                               backend="triton"), 1, 105, 2, 36)


def test_tile_permutation_and_starts_built_under_inference_mode_serve_training():
    layout = TileLayout((3, 5, 7), (1, 2, 3))
    blocks = sliding_tile(layout, (1, 3, 3))
    _infer_then_train(lambda q, k, v: layout.to_tiles(q), 1, 105, 2, 16)
    _infer_then_train(lambda q, k, v: ops.block_sparse_attention(q, k, v, blocks, backend="triton"), 1, 105, 2, 16)


def test_sparse_model_sampled_under_inference_mode_then_trained():
    model = tiny_dit(SparseAttention(pattern="sliding_tile", density=0.5, tile=(2, 2, 2)), backend="torch")
    x, t, y = dit_inputs()
    model.eval()
    with torch.inference_mode():
        model(x, t, y)
    model.train()
    out = model(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.bool))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
