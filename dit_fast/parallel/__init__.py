"""Past one GPU: sequence parallelism (Ulysses, ring, USP) for DiTVideo on torch.distributed.

    mesh.py             ParallelDims (degrees checked against the world size), init_from_env (torchrun)
    sequence.py         sequence_parallel(model, mesh, mode), reduce_gradients(model)
    ring.py             ring attention (K/V blocks around the ring, merged by log-sum-exp)
    attention_parts.py  attention over key blocks merged by log-sum-exp (ring attention's building blocks)
    comm.py             every collective (all-to-all, gather, ring exchange, sums), with autograd
"""

from dit_fast.parallel.attention_parts import attention_block_backward, attention_block_forward, merge_partials
from dit_fast.parallel.mesh import ParallelDims, init_from_env
from dit_fast.parallel.sequence import reduce_gradients, sequence_parallel

__all__ = ["attention_block_forward", "attention_block_backward", "merge_partials", "ParallelDims", "init_from_env",
           "sequence_parallel", "reduce_gradients"]
