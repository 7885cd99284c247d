"""dit_fast.optim: memory-lean optimizers.

    from dit_fast.optim import GaLoreAdamW, galore_param_groups
    opt = GaLoreAdamW(galore_param_groups(model, rank=128), lr=1e-4, state_dtype="int8")
"""

from dit_fast.optim.galore import GaLoreAdamW, resolve_side
from dit_fast.optim.groups import galore_param_groups, state_bytes_for

__all__ = ["GaLoreAdamW", "galore_param_groups", "resolve_side", "state_bytes_for"]
