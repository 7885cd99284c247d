"""What GaLoreAdamW accepts: parameter groups, parameters, and every entry of a loaded state dict.

Each check raises ValueError (a bad value) or TypeError (a bad type) whose message names the group or
parameter (its index among all parameters, its group and shape), the key, and what was expected, so
that a bad setting or a corrupt / mismatched checkpoint fails at construction or at load_state_dict,
never later inside a matmul, an SVD or an AttributeError.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from dit_fast.optim import reference as ref

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
STATE_DTYPES = ("fp32", "bf16", "int8")
REFRESH_METHODS = ("svd", "randomized")
DECAY_MODES = ("adamw", "galore")
PLAIN_STEPS = ("adamw", "galore")
KERNEL_VARIANTS = ("hybrid", "fused")
NONFINITE = ("raise", "skip")
# state["side"] is stored as an index into SIDES: torch.optim.Optimizer.load_state_dict would turn a
# string state value into a generator (it recurses into iterables)
SIDES = ("right", "left", "full")
STATE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# group keys added after state dicts were first saved: filled from the current group when missing
NEW_GROUP_KEYS = ("plain_step",)
_FP32 = torch.finfo(torch.float32)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_group(group: dict, where: str = "param group") -> None:
    """Raises ValueError / TypeError naming the bad key of a parameter group (like torch.optim.AdamW
    for lr, betas, eps, weight_decay; eps must be > 0; every number must fit fp32)."""
    for key in ("lr", "eps", "weight_decay", "scale"):
        value = group[key]
        if not _is_real(value):
            raise TypeError(f"{where}: {key} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: {key} must be finite and >= 0, got {value}")
        if value > _FP32.max:
            raise ValueError(f"{where}: {key} = {value} overflows fp32 (max {_FP32.max:.3g})")
    if group["eps"] < _FP32.tiny:  # 0, or a value that vanishes in fp32: 0 / 0 = NaN where v = 0
        raise ValueError(f"{where}: eps must be > 0 and at least fp32's smallest normal number "
                         f"{_FP32.tiny:.3g}, got {group['eps']}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_is_real(b) for b in betas):
        raise TypeError(f"{where}: betas must be a pair of numbers, got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}: betas[{i}] must be in [0, 1), got {b}")
    if "rank" in group:
        rank = group["rank"]
        if not _is_int(rank):
            raise TypeError(f"{where}: rank must be an int, got {type(rank).__name__}")
        if rank <= 0:
            raise ValueError(f"{where}: rank must be > 0, got {rank}")
    gap = group["update_proj_gap"]
    if not _is_int(gap):
        raise TypeError(f"{where}: update_proj_gap must be an int, got {type(gap).__name__}")
    if gap <= 0:
        raise ValueError(f"{where}: update_proj_gap must be > 0, got {gap}")
    for key, allowed in (("proj_type", PROJ_TYPES), ("state_dtype", STATE_DTYPES), ("refresh", REFRESH_METHODS),
                         ("weight_decay_mode", DECAY_MODES), ("kernel", KERNEL_VARIANTS),
                         ("plain_step", PLAIN_STEPS)):
        if group[key] not in allowed:
            raise ValueError(f"{where}: {key} must be one of {allowed}, got {group[key]!r}")
    for key in ("refresh_iters", "oversample"):
        if not _is_int(group[key]) or group[key] < 0:
            raise ValueError(f"{where}: {key} must be an int >= 0, got {group[key]!r}")
    for key in ("correct_bias", "rotate_moments"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{where}: {key} must be a bool, got {group[key]!r}")


def check_params(params: Iterable[torch.Tensor], first_index: int, where: str) -> None:
    """Floating-point parameters only (torch.optim.AdamW fails at its first step on an integer one)."""
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: parameter {first_index + i} must be a torch.Tensor, got {type(p).__name__}")
        if not p.dtype.is_floating_point:
            raise TypeError(f"{where}: parameter {first_index + i} has dtype {p.dtype}; GaLoreAdamW steps "
                            "floating-point parameters only (fp32, bf16, fp16)")


# ------------------------------------------------------------------ loaded state dicts


def merge_loaded_groups(saved_groups, current_groups: list) -> list:
    """The groups a load installs: the saved ones (as torch.optim.Optimizer.load_state_dict does), each
    checked for missing keys and values; keys newer than the checkpoint come from the current group."""
    if not isinstance(saved_groups, (list, tuple)):
        raise TypeError(f"state_dict['param_groups'] must be a list of dicts, got {type(saved_groups).__name__}")
    if len(saved_groups) != len(current_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this optimizer "
                         f"{len(current_groups)}")
    merged = []
    for i, (saved, current) in enumerate(zip(saved_groups, current_groups)):
        where = f"state_dict['param_groups'][{i}]"
        if not isinstance(saved, dict):
            raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
        params = saved.get("params")
        if not isinstance(params, (list, tuple)):
            raise ValueError(f"{where} has no 'params' list")
        if len(params) != len(current["params"]):
            raise ValueError(f"{where} holds {len(params)} parameters, this optimizer's group {i} "
                             f"{len(current['params'])}")
        required = [k for k in current if k not in ("params", "param_names", "rank") and k not in NEW_GROUP_KEYS]
        missing = [k for k in required if k not in saved]
        if missing:
            raise ValueError(f"{where} is missing the keys {missing} (a GaLoreAdamW group has {sorted(required)})")
        group = dict(saved)
        for key in NEW_GROUP_KEYS:
            group.setdefault(key, current[key])
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        check_group(group, where)
        merged.append(group)
    return merged


def _check_int(entry: dict, key: str, where: str, low: int = 0, high: Optional[int] = None) -> None:
    value = entry[key]
    if not _is_int(value):
        raise TypeError(f"{where}: {key} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{where}: {key} must be {bound}, got {value}")


def _check_tensor(entry: dict, key: str, where: str, shape, dtype: torch.dtype, finite: bool = True,
                  nonnegative: bool = False) -> None:
    value = entry.get(key)
    if value is None:
        raise ValueError(f"{where}: {key} is missing (expected a {dtype} tensor of shape {tuple(shape)})")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {key} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                         "(a state saved for a parameter of another shape, or another rank?)")
    if value.dtype != dtype:
        raise ValueError(f"{where}: {key} has dtype {value.dtype}, expected {dtype}")
    if finite and value.dtype.is_floating_point and value.numel():
        # DTensors check their local rows: each rank validates the part it loads
        data = value.to_local() if hasattr(value, "to_local") else value
        if data.numel() and not bool(torch.isfinite(data).all()):
            raise ValueError(f"{where}: {key} holds NaN or inf")
        if nonnegative and data.numel() and bool((data < 0).any()):
            raise ValueError(f"{where}: {key} holds negative values (a second moment is >= 0)")


def _moment_keys(state_dtype: str):
    return ("exp_avg", "exp_avg_sq") + (("exp_avg_absmax", "exp_avg_sq_absmax") if state_dtype == "int8" else ())


def check_param_state(entry, shape, dtype: torch.dtype, group: dict, where: str) -> None:
    """Every entry of one parameter's loaded state against its (global) shape and its group's settings."""
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
    projected = "rank" in group and len(shape) == 2
    state_dtype = group["state_dtype"]
    allowed = {"step", "micro_step"} | set(_moment_keys(state_dtype))
    if projected:
        allowed |= {"side", "refreshes", "basis_left", "basis_right"}
    unknown = sorted(str(k) for k in entry if k not in allowed)
    if unknown:
        raise ValueError(f"{where}: unexpected keys {unknown} for a {'projected' if projected else 'plain'} "
                         f"parameter with state_dtype {state_dtype!r} (expected some of {sorted(allowed)})")
    if "micro_step" in entry:
        _check_int(entry, "micro_step", where)
    if "step" not in entry:
        extra = sorted(str(k) for k in entry if k != "micro_step")
        if extra:
            raise ValueError(f"{where}: has {extra} but no 'step'")
        return
    _check_int(entry, "step", where)
    if entry["step"] == 0:
        return
    if projected:
        for key in ("side", "refreshes"):
            if key not in entry:
                raise ValueError(f"{where}: a projected parameter at step {entry['step']} needs {key!r}")
        _check_int(entry, "side", where, 0, len(SIDES) - 1)
        _check_int(entry, "refreshes", where, 1)
        side = SIDES[entry["side"]]
        m, n = shape
        k = min(group["rank"], m, n)
        if side in ("left", "full"):
            _check_tensor(entry, "basis_left", where, (m, k), dtype)
        elif "basis_left" in entry:
            raise ValueError(f"{where}: basis_left present but the stored side is {side!r}")
        if side in ("right", "full"):
            _check_tensor(entry, "basis_right", where, (k, n), dtype)
        elif "basis_right" in entry:
            raise ValueError(f"{where}: basis_right present but the stored side is {side!r}")
        low = {"right": (m, k), "left": (k, n), "full": (k, k)}[side]
    else:
        low = tuple(shape)
    if state_dtype == "int8":
        blocks = (ref.block_count(math.prod(low)),)
        _check_tensor(entry, "exp_avg", where, low, torch.int8)
        _check_tensor(entry, "exp_avg_sq", where, low, torch.uint8)
        _check_tensor(entry, "exp_avg_absmax", where, blocks, torch.float32, nonnegative=True)
        _check_tensor(entry, "exp_avg_sq_absmax", where, blocks, torch.float32, nonnegative=True)
    else:
        _check_tensor(entry, "exp_avg", where, low, STATE_TORCH_DTYPES[state_dtype])
        _check_tensor(entry, "exp_avg_sq", where, low, STATE_TORCH_DTYPES[state_dtype], nonnegative=True)


def row_split_keys(entry: dict) -> tuple:
    """State keys whose rows a sharded optimizer splits (the rest is whole on every rank)."""
    return tuple(k for k in ("exp_avg", "exp_avg_sq", "basis_left") if k in entry)
