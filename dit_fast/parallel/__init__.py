"""Past one GPU: sequence parallelism (Ulysses, ring, USP) for DiTVideo on torch.distributed.

    attention_parts   attention over key blocks merged by log-sum-exp (ring attention's building blocks)
"""

from dit_fast.parallel.attention_parts import attention_block_backward, attention_block_forward, merge_partials

__all__ = ["attention_block_forward", "attention_block_backward", "merge_partials"]
