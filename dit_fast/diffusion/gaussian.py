"""Gaussian diffusion for DiT checkpoints: epsilon prediction with learned sigma, DDPM and DDIM sampling.

Follows facebookresearch/DiT's diffusion package (from OpenAI's improved-diffusion): a linear beta
schedule over 1000 steps, learned-range variances, the hybrid loss (MSE on epsilon + the variational
bound with the mean frozen, rescaled by T / 1000) and respacing to fewer sampling steps ("250", "ddim50").

    diffusion = GaussianDiffusion(timestep_respacing="250")
    samples = diffusion.p_sample_loop(model, (B, 4, 1, 32, 32), model_kwargs={"y": y}, cfg_scale=4.0)
"""

import math
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dit_fast._checks import check_bool, check_int, check_number
from dit_fast.diffusion.guidance import draw, initial_noise, model_output, progress

# linear_beta_schedule's largest beta is 0.02 * 1000 / T: T must exceed 20 for every beta to stay below 1
MIN_TIMESTEPS = 21


#################################################################################
#                                   Schedules                                   #
#################################################################################

def linear_beta_schedule(num_timesteps: int = 1000) -> np.ndarray:
    """DiT's betas: linear from 1e-4 to 0.02, scaled so that any T matches the 1000-step schedule."""
    num_timesteps = _check_num_timesteps(num_timesteps)
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def _check_num_timesteps(num_timesteps) -> int:
    num_timesteps = check_int("num_timesteps", num_timesteps)
    if num_timesteps < MIN_TIMESTEPS:
        raise ValueError(f"num_timesteps must be >= {MIN_TIMESTEPS}: the linear schedule's largest beta, "
                         f"0.02 * 1000 / num_timesteps, must stay below 1; got {num_timesteps}")
    return num_timesteps


def _section_counts(section_counts, num_timesteps: int) -> List[int]:
    """The respacing's sections as a list of positive ints; ValueError naming timestep_respacing otherwise."""
    given = section_counts
    if isinstance(section_counts, str):
        parts = section_counts.split(",")
        if not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"timestep_respacing must be '' (all steps), 'N', 'N1,N2,...' or 'ddimN' with "
                             f"positive ints N, got {given!r}")
        section_counts = [int(p) for p in parts]
    elif isinstance(section_counts, (list, tuple)):
        section_counts = [check_int("timestep_respacing section", c) for c in section_counts]
    else:
        raise TypeError(f"timestep_respacing must be a str or a list of ints, got {type(given).__name__}")
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"timestep_respacing must keep at least one step in each section, got {given!r}")
    if len(section_counts) > num_timesteps:
        raise ValueError(f"timestep_respacing {given!r} has {len(section_counts)} sections for only "
                         f"{num_timesteps} steps")
    return section_counts


def space_timesteps(num_timesteps: int, section_counts) -> List[int]:
    """improved-diffusion's respacing: "250" (evenly strided sections) or "ddimN" (stride for exactly N)."""
    num_timesteps = check_int("num_timesteps", num_timesteps)
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        count = section_counts[len("ddim"):]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"timestep_respacing 'ddimN' needs a positive int N, got {section_counts!r}")
        desired = int(count)
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == desired:
                return sorted(range(0, num_timesteps, stride))
        raise ValueError(f"timestep_respacing {section_counts!r}: cannot create exactly {desired} steps with an "
                         f"integer stride from {num_timesteps}")
    section_counts = _section_counts(section_counts, num_timesteps)
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"timestep_respacing: cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken = 0.0, []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return sorted(set(all_steps))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretized to 256 bins under N(means, exp(log_scales)^2)."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.dim())))


#################################################################################
#                               Gaussian Diffusion                              #
#################################################################################

class GaussianDiffusion:
    """DDPM/DDIM with epsilon prediction; ``learn_sigma`` models output [eps, v] with 2C channels.

    timestep_respacing: "" for all 1000 steps, "250", "ddim50", ...; the model always sees the
    original timestep index (DiT's SpacedDiffusion with rescale_timesteps=False).
    """

    def __init__(self, timestep_respacing: str = "", num_timesteps: int = 1000, learn_sigma: bool = True):
        num_timesteps = _check_num_timesteps(num_timesteps)
        check_bool("learn_sigma", learn_sigma)
        base_betas = linear_beta_schedule(num_timesteps)
        use_timesteps = space_timesteps(num_timesteps, timestep_respacing or [num_timesteps])
        if len(use_timesteps) < 2:  # the posterior's clipped log variance starts from the second step
            raise ValueError(f"timestep_respacing {timestep_respacing!r} keeps {len(use_timesteps)} step; "
                             "sampling needs at least 2")
        alphas_cumprod = np.cumprod(1.0 - base_betas)
        last, betas = 1.0, []
        for i in use_timesteps:  # the respaced chain keeps alphas_cumprod at the kept steps
            betas.append(1 - alphas_cumprod[i] / last)
            last = alphas_cumprod[i]
        self.timestep_map = torch.tensor(use_timesteps, dtype=torch.long)
        self.learn_sigma = learn_sigma
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        self.num_timesteps = len(betas)
        self.original_num_steps = num_timesteps

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance, clipped because it is 0 at the start of the chain
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ---- the forward process ----

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) (diffusers' ``add_noise``): t holds B integer steps in [0, num_timesteps)."""
        _check_noising(x_start, noise, t, "x_start")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps (torch.long), got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t must be in [0, {self.num_timesteps}), got values in [{int(t.min())}, {int(t.max())}]")
        return (_extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x_start + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance_clipped, t, x_t)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # ---- the model's reverse process ----

    def p_mean_variance(self, model, x, t, model_kwargs=None, cfg_scale=1.0, clip_denoised=False, model_out=None):
        """The model's p(x_{t-1} | x_t): mean, log variance, predicted x_0 and epsilon (float32)."""
        if model_out is None:
            model_out = model_output(model, x, self.timestep_map.to(x.device)[t], model_kwargs, cfg_scale)
        C = x.shape[1]
        model_out = model_out.float()
        x = x.float()
        if self.learn_sigma:
            if model_out.shape[1] != 2 * C:
                raise ValueError(f"a learn_sigma model must output 2C = {2 * C} channels, got {model_out.shape[1]}")
            eps, var_values = model_out[:, :C], model_out[:, C:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(np.log(self.betas), t, x)
            frac = (var_values + 1) / 2  # the model's [-1, 1] output interpolates between the two bounds
            log_variance = frac * max_log + (1 - frac) * min_log
        else:  # DiT's FIXED_LARGE
            eps = model_out[:, :C]
            log_variance = _extract(np.log(np.append(self.posterior_variance[1], self.betas[1:])), t, x)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    @torch.no_grad()
    def p_sample_loop(self, model, shape: Sequence[int], *, model_kwargs=None, cfg_scale=1.0, clip_denoised=False,
                      noise=None, generator=None, device=None, dtype=torch.float32, progress_bar=True) -> Tensor:
        """Ancestral (DDPM) sampling over the respaced chain; seed it with ``generator``."""
        x = initial_noise(shape, noise=noise, generator=generator, device=device, dtype=dtype)
        for i in progress(range(self.num_timesteps)[::-1], progress_bar, "DDPM"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(model, x, t, model_kwargs, cfg_scale, clip_denoised)
            if i > 0:
                z = draw(torch.randn, x.shape, generator, x.device)
                x = (out["mean"] + torch.exp(0.5 * out["log_variance"]) * z).to(dtype)
            else:
                x = out["mean"].to(dtype)
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model, shape: Sequence[int], *, model_kwargs=None, cfg_scale=1.0, eta=0.0,
                         clip_denoised=False, noise=None, generator=None, device=None, dtype=torch.float32,
                         progress_bar=True) -> Tensor:
        """DDIM sampling (eta = 0: deterministic given the initial noise)."""
        check_number("eta", eta, 0)
        x = initial_noise(shape, noise=noise, generator=generator, device=device, dtype=dtype)
        for i in progress(range(self.num_timesteps)[::-1], progress_bar, "DDIM"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(model, x, t, model_kwargs, cfg_scale, clip_denoised)
            eps = self._predict_eps_from_xstart(x.float(), t, out["pred_xstart"])
            alpha_bar = _extract(self.alphas_cumprod, t, x)
            alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x)
            sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
            mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
            if i > 0 and eta > 0:
                mean = mean + sigma * draw(torch.randn, x.shape, generator, x.device)
            x = mean.to(dtype)
        return x

    # ---- training ----

    def training_losses(self, model, x_start: Tensor, model_kwargs=None, t: Optional[Tensor] = None,
                        noise: Optional[Tensor] = None, generator=None) -> dict:
        """DiT's loss per sample: MSE on epsilon, plus the VB term with frozen mean when sigma is learned."""
        B, C = x_start.shape[:2]
        if t is None:
            t = (draw(torch.rand, (B,), generator, x_start.device) * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)
        if noise is None:
            noise = draw(torch.randn, x_start.shape, generator, x_start.device, x_start.dtype)
        x_t = self.q_sample(x_start, t, noise).to(x_start.dtype)
        out = model(x_t, self.timestep_map.to(x_start.device)[t], **(model_kwargs or {}))
        terms = {"mse": _mean_flat((noise.float() - out[:, :C].float()) ** 2)}
        if self.learn_sigma:
            # the variance is learned only through the VB term; the mean is frozen there
            frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
            terms["vb"] = self._vb_terms_bpd(x_start, x_t, t, frozen) * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _vb_terms_bpd(self, x_start, x_t, t, model_out):
        """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits per dim; the decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start.float(), x_t.float(), t)
        out = self.p_mean_variance(None, x_t, t, model_out=model_out)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start.float(), out["mean"], 0.5 * out["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _check_noising(x: Tensor, noise: Tensor, t: Tensor, x_name: str) -> None:
    """The shared checks of add_noise / q_sample: tensors, noise shaped like x, one timestep per sample (B,)."""
    for name, value in ((x_name, x), ("noise", noise), ("t", t)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if x.dim() < 1 or noise.shape != x.shape:
        raise ValueError(f"noise must have {x_name}'s shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    if tuple(t.shape) != (x.shape[0],):
        raise ValueError(f"t must hold one timestep per sample, shape (B,) = ({x.shape[0]},) for {x_name} "
                         f"{tuple(x.shape)}, got {tuple(t.shape)}")


def _extract(arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
    """arr[t] as float32 of shape (B, 1, ..., 1) to broadcast against ``like``."""
    values = torch.from_numpy(np.asarray(arr)).to(device=t.device)[t].float()
    return values.reshape(-1, *([1] * (like.dim() - 1)))
