"""dit_fast.diffusion: rectified flow (velocity, Euler with timestep shift) and DiT's Gaussian diffusion.

    flow = RectifiedFlow()
    loss = flow.training_losses(model, x0, {"text": text, "text_mask": mask})["loss"].mean()
    video = flow.sample(model, (1, 3, 16, 32, 32), steps=30, cfg_scale=4.0, model_kwargs=...,
                        generator=torch.Generator().manual_seed(0))
"""

from dit_fast.diffusion.gaussian import GaussianDiffusion, space_timesteps
from dit_fast.diffusion.guidance import model_output
from dit_fast.diffusion.rectified_flow import RectifiedFlow, resolution_shift, shift_timesteps

__all__ = ["RectifiedFlow", "GaussianDiffusion", "model_output", "resolution_shift", "shift_timesteps",
           "space_timesteps"]
