"""Layout facts the launchers check before promising them to Triton as compile-time hints."""


def aligned_16(tensors, head_dim: int) -> bool:
    """Every pointer and (batch, token, head) stride of the (B, S, heads, D) tensors a multiple of 16
    bytes, and so the fresh outputs' too (their strides are multiples of D).

    Triton sees a 16-divisible integer argument, never a head stride such as 72: without this check
    and the ALIGNED hint the kernels load one element at a time."""
    size = tensors[0].element_size()
    return (head_dim * size) % 16 == 0 and all(
        t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:3]) for t in tensors)
