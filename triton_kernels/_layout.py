"""Layout facts the launchers check before promising them to Triton as compile-time hints."""


def aligned_16(tensors, head_dim: int) -> bool:
    """Every pointer and (batch, token, head) stride of the (B, S, heads, D) tensors a multiple of 16
    bytes, and a head dim of 16-byte rows in each tensor's dtype (so the fresh outputs' strides, multiples
    of D, are too). Any head dim passes through here: D = 10 in bf16 (20-byte rows) is simply not aligned,
    and the kernels then load without the hint, at the widths Triton can prove.

    Triton sees a 16-divisible integer argument, never a head stride such as 72: without this check
    and the ALIGNED hint the kernels load one element at a time."""
    return all((head_dim * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:3]) for t in tensors)
