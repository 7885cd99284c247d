"""Rectified flow: velocity prediction and an Euler sampler with a resolution/length-dependent shift.

    x_t = (1 - t) * x_0 + t * noise,   t in [0, 1] (t = 1 is pure noise)
    the model predicts v = noise - x_0 from (x_t, num_timesteps * t)
    sampling integrates dx/dt = v from t = 1 to t = 0 with Euler steps.

Timestep shift (SD3, Open-Sora 1.2, Wan): larger and longer inputs keep more noise for longer,
    t' = s * t / (1 + (s - 1) * t),  s = sqrt(H * W / base_resolution) * sqrt(T / base_num_frames) * scale
as Open-Sora 1.2's ``timestep_transform``; ``shift=`` fixes s instead (Wan uses a fixed 5.0 at 480p).
"""

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from dit_fast._checks import check_choice, check_int, check_number
from dit_fast.diffusion.guidance import draw, initial_noise, model_output, progress


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """t' = shift * t / (1 + (shift - 1) * t): keeps 0 and 1 fixed, moves the middle toward 1 for shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_frames: int, height: int, width: int, base_resolution: int = 32 * 32,
                     base_num_frames: int = 1, scale: float = 1.0) -> float:
    """Open-Sora 1.2's shift: sqrt(H * W / base_resolution) * sqrt(T / base_num_frames) * scale."""
    return ((height * width / base_resolution) ** 0.5) * ((num_frames / base_num_frames) ** 0.5) * scale


class RectifiedFlow:
    """Rectified-flow training loss and Euler sampler for models predicting v = noise - x_0.

    shift: "auto" (from the input's frames and size, see ``resolution_shift``), or a number (1.0: no shift).
    num_timesteps: the model sees t scaled to [0, num_timesteps] (1000, as DiT's timestep embedding expects).
    sample_t: "logit_normal" (SD3's training distribution) or "uniform".
    """

    def __init__(self, shift: Union[str, float] = "auto", num_timesteps: int = 1000, sample_t: str = "logit_normal",
                 base_resolution: int = 32 * 32, base_num_frames: int = 1, shift_scale: float = 1.0):
        check_choice("sample_t", sample_t, ("logit_normal", "uniform"))
        if shift != "auto":
            if isinstance(shift, str) or isinstance(shift, bool) or not isinstance(shift, (int, float)):
                raise ValueError(f"shift must be 'auto' or a positive number, got {shift!r}")
            check_number("shift", shift, 0, low_open=True)
        check_number("num_timesteps", num_timesteps, 0, low_open=True)
        check_int("base_resolution", base_resolution)
        check_int("base_num_frames", base_num_frames)
        check_number("shift_scale", shift_scale, 0, low_open=True)
        self.shift = shift
        self.num_timesteps = num_timesteps
        self.sample_t = sample_t
        self.base_resolution = base_resolution
        self.base_num_frames = base_num_frames
        self.shift_scale = shift_scale

    def shift_for(self, shape: Sequence[int]) -> float:
        """The shift for inputs of shape (B, C, T, H, W)."""
        if self.shift != "auto":
            return float(self.shift)
        T, H, W = shape[-3:]
        return resolution_shift(T, H, W, self.base_resolution, self.base_num_frames, self.shift_scale)

    # ---- training ----

    def sample_timesteps(self, shape, device=None, generator=None) -> Tensor:
        """t in (0, 1) of the given shape, from the training distribution, before the shift."""
        if self.sample_t == "uniform":
            return draw(torch.rand, shape, generator, device)
        return torch.sigmoid(draw(torch.randn, shape, generator, device))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t) x_0 + t noise; t: (B,) or per frame (B, T), in [0, 1]."""
        for name, value in (("x0", x0), ("noise", noise), ("t", t)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        t = _broadcast(t, x0)
        return (1 - t) * x0 + t * noise

    def training_losses(self, model, x0: Tensor, model_kwargs: Optional[dict] = None, t: Optional[Tensor] = None,
                        noise: Optional[Tensor] = None, per_frame: bool = False, generator=None) -> dict:
        """Velocity MSE per sample: {"loss": (B,), "t": t}. x0: (B, C, T, H, W).

        per_frame: one timestep per latent frame of tokens, (B, T / pt), for models built with
        ``per_frame_timesteps=True`` (frames of one clip at different noise levels, as diffusion forcing).
        """
        if x0.dim() != 5:
            raise ValueError(f"x0 must be (B, C, T, H, W), got {tuple(x0.shape)}")
        B, C, T = x0.shape[:3]
        pt = getattr(model, "patch_size", (1,))[0]
        if t is None:
            t_shape = (B, T // pt) if per_frame else (B,)
            t = shift_timesteps(self.sample_timesteps(t_shape, x0.device, generator), self.shift_for(x0.shape))
        if noise is None:
            noise = draw(torch.randn, x0.shape, generator, x0.device, x0.dtype)
        t_frames = t.repeat_interleave(pt, dim=1) if t.dim() == 2 else t  # (B,) or (B, T)
        x_t = self.add_noise(x0, noise, t_frames).to(x0.dtype)
        v = model(x_t, t * self.num_timesteps, **(model_kwargs or {}))[:, :C]  # learned sigma, if any, unused
        target = noise - x0
        loss = ((v.float() - target.float()) ** 2).mean(dim=tuple(range(1, x0.dim())))
        return {"loss": loss, "t": t}

    # ---- sampling ----

    def timesteps(self, steps: int, shape: Sequence[int]) -> Tensor:
        """steps + 1 times from 1 to 0 (float64), evenly spaced then shifted."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), self.shift_for(shape))

    @torch.no_grad()
    def sample(self, model, shape: Sequence[int], *, steps: int = 50, model_kwargs: Optional[dict] = None,
               cfg_scale: float = 1.0, noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
               device=None, dtype=torch.float32, progress_bar: bool = True) -> Tensor:
        """Euler integration from noise (t = 1) to data (t = 0); returns x_0 of ``shape`` (B, C, T, H, W).

        Reproducible: the only randomness is the initial noise, drawn from ``generator``.
        """
        x = initial_noise(shape, noise=noise, generator=generator, device=device, dtype=dtype)
        times = self.timesteps(steps, x.shape)
        C = x.shape[1]
        for i in progress(range(steps), progress_bar, "sampling"):
            t, t_next = times[i].item(), times[i + 1].item()
            t_batch = torch.full((x.shape[0],), t * self.num_timesteps, device=x.device, dtype=torch.float32)
            v = model_output(model, x, t_batch, model_kwargs, cfg_scale)[:, :C]  # (B, C, T, H, W)
            x = (x.float() + (t_next - t) * v.float()).to(x.dtype)
        return x


def _broadcast(t: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1, 1); per frame (B, T) -> (B, 1, T, 1, 1), to scale x of shape (B, C, T, H, W)."""
    if x.dim() >= 1 and tuple(t.shape) == (x.shape[0],):
        return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    if t.dim() == 2 and x.dim() == 5 and t.shape == (x.shape[0], x.shape[2]):
        return t[:, None, :, None, None].to(x.dtype)
    per_frame = f" or per frame (B, T) = ({x.shape[0]}, {x.shape[2]})" if x.dim() == 5 else ""
    raise ValueError(f"t must hold one timestep per sample, (B,) = ({x.shape[0] if x.dim() else '?'},){per_frame}, "
                     f"for x {tuple(x.shape)}, got {tuple(t.shape)}")
