"""Model calls shared by the samplers: classifier-free guidance batched in one forward, progress bars."""

from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dit_fast._checks import check_number


def _double(value):
    return torch.cat([value, value], dim=0) if isinstance(value, Tensor) else value


def model_output(model, x: Tensor, t: Tensor, model_kwargs: Optional[dict] = None, cfg_scale: float = 1.0) -> Tensor:
    """``model(x, t, **model_kwargs)``, or with guidance the guided output of one batched forward.

    With ``cfg_scale != 1`` the batch is doubled (conditioned, then unconditioned) and sent once through
    ``model.forward_with_cfg``, which drops labels/captions of the second half (DiT's convention); the
    first half of its output is the guided prediction.
    """
    model_kwargs = model_kwargs or {}
    check_number("cfg_scale", cfg_scale)  # nan or inf would turn every sample into NaN
    if cfg_scale == 1.0:
        return model(x, t, **model_kwargs)
    if not hasattr(model, "forward_with_cfg"):
        raise TypeError(f"cfg_scale={cfg_scale} needs a model with forward_with_cfg, got {type(model).__name__}")
    doubled = {k: _double(v) for k, v in model_kwargs.items()}
    out = model.forward_with_cfg(_double(x), _double(t), cfg_scale=cfg_scale, **doubled)
    return out[: len(x)]


def progress(iterable, enabled: bool, desc: str):
    """A tqdm bar over ``iterable`` (shown only when ``enabled``)."""
    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def draw(fn, shape, generator=None, device=None, dtype=torch.float32) -> Tensor:
    """``fn(shape)`` (torch.randn / torch.rand) from ``generator`` on its own device, then moved to ``device``.

    So a CPU generator seeds GPU sampling, and one seed gives the same numbers on every device.
    """
    if generator is None:
        return fn(tuple(shape), device=device, dtype=dtype)
    return fn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device or generator.device)


def initial_noise(shape, *, noise=None, generator=None, device=None, dtype=torch.float32) -> Tensor:
    """The starting noise: ``noise`` as given, else ``randn(shape)`` drawn from ``generator``."""
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}")
        return noise.to(device=device or noise.device)
    return draw(torch.randn, shape, generator, device, dtype)
