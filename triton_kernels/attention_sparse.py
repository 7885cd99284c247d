"""Block-sparse attention kernels (not yet landed: backend="torch" runs the reference)."""

from dit_fast._backend import BackendUnavailableError


def block_sparse_forward(*args, **kwargs):
    raise BackendUnavailableError("block_sparse_attention: the Triton kernels have not landed yet; use backend='torch'")


block_sparse_backward = block_sparse_forward
