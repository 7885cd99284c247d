"""Argument checks shared by constructors (dit_fast.nn, dit_fast.models, dit_fast.diffusion).

Each returns the normalised value or raises a ValueError / TypeError that names the argument, says
what was expected and shows what was given: a constructor fails at once with a readable message,
never later with a ZeroDivisionError, an IndexError deep inside torch, or a silently truncated value.
"""

import math
import numbers
import operator
from typing import Optional, Sequence, Tuple

import torch

# float32's normal range: a positive constant outside it vanishes to 0 (or a subnormal, flushed to 0
# on GPUs) or overflows to inf once the kernels compute with it in fp32.
FP32_TINY = torch.finfo(torch.float32).tiny  # 1.18e-38
FP32_MAX = torch.finfo(torch.float32).max  # 3.40e38
BACKEND_NAMES = ("auto", "triton", "cuda", "torch")


def check_int(name: str, value, low: Optional[int] = 1, high: Optional[int] = None) -> int:
    """An int (or numpy / 0-d integer tensor) in [low, high]; bools and floats are refused, not truncated."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
    if (low is not None and value < low) or (high is not None and value > high):
        span = (f"in [{low}, {high}]" if high is not None else f">= {low}") if low is not None else f"<= {high}"
        raise ValueError(f"{name} must be an int {span}, got {value}")
    return value


def check_number(name: str, value, low: Optional[float] = None, high: Optional[float] = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the interval given (open or closed at each end)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    ok = math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = ([f"{'>' if low_open else '>='} {low:g}"] if low is not None else []) + (
            [f"{'<' if high_open else '<='} {high:g}"] if high is not None else [])
        raise ValueError(f"{name} must be a finite number{' ' if bounds else ''}{' and '.join(bounds)}, got {value!r}")
    return value


def check_fp32_positive(name: str, value) -> float:
    """A positive constant used in fp32 arithmetic: within [1.18e-38, 3.4e38], so it neither vanishes nor
    overflows (eps=1e-300 is 0 in fp32: a constant row then divides by zero)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (FP32_TINY <= value <= FP32_MAX):
        raise ValueError(f"{name} must be a positive number within float32's normal range "
                         f"[{FP32_TINY:.3g}, {FP32_MAX:.3g}] (it is used in float32), got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_backend(value) -> str:
    """A backend name (availability is checked where an op runs: BackendUnavailableError)."""
    return check_choice("backend", value, BACKEND_NAMES)


def check_int_triple(name: str, value, low: int = 1, scalar_means=None) -> Tuple[int, int, int]:
    """Three ints >= low, as a tuple; ``scalar_means(v)`` expands one int (e.g. p -> (1, p, p))."""
    given = value
    if scalar_means is not None and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = scalar_means(int(value))
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not isinstance(value, torch.Size):
        raise TypeError(f"{name} must be {'an int or ' if scalar_means else ''}three ints, got {value!r}")
    if len(value) != 3:
        raise ValueError(f"{name} must be {'an int or ' if scalar_means else ''}three ints, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool):
            raise TypeError(f"{name} must hold ints, got {value!r}")
        try:
            v = operator.index(v)
        except TypeError:
            raise TypeError(f"{name} must hold ints, got {value!r}") from None
        if v < low:
            raise ValueError(f"{name} must be {'an int or ' if scalar_means else ''}three ints >= {low}, "
                             f"got {given!r}")
        out.append(v)
    return tuple(out)
