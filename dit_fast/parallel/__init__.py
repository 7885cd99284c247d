"""Past one GPU: sequence parallelism (Ulysses, ring, USP) for DiTVideo on torch.distributed.

    mesh.py             ParallelDims (degrees checked against the world size), init_from_env (torchrun)
    sequence.py         sequence_parallel(model, mesh, mode), reduce_gradients(model)
    grad_sync.py        the gradient sums over the sequence-parallel ranks (automatic, or reduce_gradients)
    ring.py             ring attention (K/V blocks around the ring, merged by log-sum-exp)
    attention_parts.py  attention over key blocks merged by log-sum-exp (ring attention's building blocks)
    comm.py             every collective (all-to-all, gather, ring exchange, sums), with autograd
    fsdp.py             apply_fsdp(model, mesh): FSDP2 fully_shard per block, then the root
    checkpoint.py       save_checkpoint / load_checkpoint (torch.distributed.checkpoint, resharding, atomic,
                        no pickles), export_safetensors
    checkpoint_files.py the files: step directories and latest, the atomic publish and its recovery, safe reads
"""

from dit_fast.parallel.attention_parts import attention_block_backward, attention_block_forward, merge_partials
from dit_fast.parallel.mesh import ParallelDims, init_from_env
from dit_fast.parallel.sequence import reduce_gradients, sequence_parallel
from dit_fast.parallel.fsdp import apply_fsdp
from dit_fast.parallel.checkpoint import (TrainerState, export_safetensors, latest_checkpoint, load_checkpoint,
                                          save_checkpoint)

__all__ = ["attention_block_forward", "attention_block_backward", "merge_partials", "ParallelDims", "init_from_env",
           "sequence_parallel", "reduce_gradients", "apply_fsdp", "TrainerState", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "export_safetensors"]
