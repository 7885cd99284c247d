"""Rectified flow and Gaussian diffusion: exact recovery with oracle models, losses, guidance, seeding."""

import math

import numpy as np
import pytest
import torch

from dit_fast.diffusion import GaussianDiffusion, RectifiedFlow, model_output, resolution_shift, shift_timesteps, space_timesteps
from dit_fast.diffusion.gaussian import linear_beta_schedule
from dit_fast.models import DiT_models
from tests import reference_dit as R

SHAPE = (2, 3, 4, 6, 6)


def tiny_model(**overrides):
    kwargs = dict(input_size=(2, 4, 4), num_classes=5, learn_sigma=False, text_dim=None, backend="torch")
    return R.randomize_(DiT_models["DiT-tiny"](**{**kwargs, **overrides})).eval()


class FlowOracle(torch.nn.Module):
    """Knows x_0: returns the exact velocity (x_t - x_0) / t of the straight path through x_t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.shape[0], t.clone()))
        return (x - self.x0) / (t / 1000).reshape(-1, 1, 1, 1, 1)


class EpsOracle(torch.nn.Module):
    """Knows x_0: returns the exact noise of x_t at the original timestep t, plus a variance channel block."""

    def __init__(self, x0, learn_sigma):
        super().__init__()
        self.x0, self.learn_sigma = x0, learn_sigma
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1 - linear_beta_schedule(1000)))

    def forward(self, x, t):
        abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
        eps = ((x.double() - abar.sqrt() * self.x0) / (1 - abar).sqrt()).float()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1) if self.learn_sigma else eps


# ---------------------------------------------------------------------------------------------
# Rectified flow
# ---------------------------------------------------------------------------------------------


def test_shift():
    assert resolution_shift(16, 32, 32) == pytest.approx(4.0)
    assert resolution_shift(1, 64, 64, base_resolution=32 * 32) == pytest.approx(2.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for s in (1.0, 3.0, 0.5):
        shifted = shift_timesteps(t, s)
        assert shifted[0] == 0 and shifted[-1] == 1 and (shifted.diff() > 0).all()
        assert (shifted >= t).all() if s >= 1 else (shifted <= t).all()
    assert torch.equal(shift_timesteps(t, 1.0), t)
    flow = RectifiedFlow()
    times = flow.timesteps(10, (1, 4, 16, 32, 32))
    assert times[0] == 1 and times[-1] == 0 and len(times) == 11
    assert torch.allclose(times, shift_timesteps(torch.linspace(1, 0, 11, dtype=torch.float64), 4.0))
    with pytest.raises(ValueError, match="shift"):
        RectifiedFlow(shift=-1)


@pytest.mark.parametrize("shift", ["auto", 1.0, 3.0])
def test_euler_with_exact_velocity_reaches_data(shift):
    x0 = torch.randn(SHAPE)
    oracle = FlowOracle(x0)
    out = RectifiedFlow(shift=shift).sample(oracle, SHAPE, steps=7, generator=torch.Generator().manual_seed(1),
                                            progress_bar=False)
    assert torch.allclose(out, x0, atol=1e-4)
    assert len(oracle.calls) == 7 and oracle.calls[0][1][0] == 1000


def test_flow_loss_zero_for_exact_velocity_and_noising():
    x0 = torch.randn(SHAPE)
    noise = torch.randn(SHAPE)
    flow = RectifiedFlow()
    t = torch.tensor([0.3, 0.9])
    out = flow.training_losses(lambda x, tt: noise - x0, x0, t=t, noise=noise)
    assert out["loss"].shape == (2,) and out["loss"].abs().max() < 1e-10
    x_t = flow.add_noise(x0, noise, t)
    assert torch.allclose(x_t[1], 0.1 * x0[1] + 0.9 * noise[1])
    # per frame: frame 0 clean, frame 3 pure noise
    per_frame = torch.tensor([[0.0, 0.5, 0.5, 1.0]] * 2)
    x_t = flow.add_noise(x0, noise, per_frame)
    assert torch.equal(x_t[:, :, 0], x0[:, :, 0]) and torch.equal(x_t[:, :, 3], noise[:, :, 3])


def test_flow_per_frame_training_with_temporal_patches():
    model = tiny_model(per_frame_timesteps=True, patch_size=(2, 2, 2), input_size=(4, 4, 4))
    seen = {}

    def spy(x, t, **kwargs):
        seen["t"] = t
        return model(x, t, **kwargs)

    x0 = torch.randn(2, 4, 4, 4, 4)
    spy.patch_size = model.patch_size
    out = RectifiedFlow().training_losses(spy, x0, {"y": torch.tensor([1, 2])}, per_frame=True,
                                          generator=torch.Generator().manual_seed(0))
    assert out["t"].shape == (2, 2) and seen["t"].shape == (2, 2)
    assert out["loss"].shape == (2,) and out["loss"].isfinite().all()


def test_flow_training_reduces_loss():
    model = tiny_model(num_classes=0, class_dropout_prob=0.0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    flow = RectifiedFlow(shift=1.0)
    x0 = torch.randn(1, 4, 2, 4, 4).expand(4, -1, -1, -1, -1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        loss = flow.training_losses(model, x0, generator=gen)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_sampling_is_seeded_and_shows_progress(capsys):
    model = tiny_model()
    flow = RectifiedFlow()
    kwargs = dict(steps=3, model_kwargs={"y": torch.tensor([0, 3])}, cfg_scale=2.0)
    a = flow.sample(model, (2, 4, 2, 4, 4), generator=torch.Generator().manual_seed(5), progress_bar=False, **kwargs)
    b = flow.sample(model, (2, 4, 2, 4, 4), generator=torch.Generator().manual_seed(5), progress_bar=True, **kwargs)
    c = flow.sample(model, (2, 4, 2, 4, 4), generator=torch.Generator().manual_seed(6), progress_bar=False, **kwargs)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert "sampling" in capsys.readouterr().err


def test_guidance_is_one_batched_forward():
    model = tiny_model()
    calls = []
    original = model.forward

    def counting(x, t, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, t, *args, **kwargs)

    model.forward = counting
    x = torch.randn(2, 4, 2, 4, 4)
    t = torch.full((2,), 700.0)
    y = torch.tensor([1, 4])
    guided = model_output(model, x, t, {"y": y}, cfg_scale=2.5)
    assert calls == [4]
    with torch.no_grad():
        cond = original(x, t, y)
        uncond = original(x, t, y, force_drop_ids=torch.ones(2, dtype=torch.bool))
    assert torch.allclose(guided, uncond + 2.5 * (cond - uncond), atol=1e-5)
    assert torch.equal(model_output(model, x, t, {"y": y}, cfg_scale=1.0), original(x, t, y))
    with pytest.raises(TypeError, match="forward_with_cfg"):
        model_output(lambda x, t: x, x, t, cfg_scale=2.0)


# ---------------------------------------------------------------------------------------------
# Gaussian diffusion
# ---------------------------------------------------------------------------------------------


def test_schedule_and_respacing():
    betas = linear_beta_schedule(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, "250")) == 250
    full, spaced = GaussianDiffusion(), GaussianDiffusion("10")
    assert full.num_timesteps == 1000 and spaced.num_timesteps == 10
    # respacing keeps the marginals q(x_t | x_0) at the kept steps
    kept = spaced.timestep_map.numpy()
    assert np.allclose(spaced.alphas_cumprod, full.alphas_cumprod[kept])
    with pytest.raises(ValueError, match="exactly"):
        space_timesteps(1000, "ddim999")


@pytest.mark.parametrize("respacing", ["", "25"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_samplers_with_exact_eps_reach_data(respacing, learn_sigma):
    x0 = torch.randn(SHAPE).clamp(-1, 1)
    diffusion = GaussianDiffusion(respacing, learn_sigma=learn_sigma)
    oracle = EpsOracle(x0, learn_sigma)
    gen = torch.Generator().manual_seed(0)
    ddim = diffusion.ddim_sample_loop(oracle, SHAPE, generator=gen, progress_bar=False)
    assert torch.allclose(ddim, x0, atol=1e-4)
    ddpm = diffusion.p_sample_loop(oracle, SHAPE, generator=gen, progress_bar=False)
    assert torch.allclose(ddpm, x0, atol=1e-4)


def test_gaussian_loss_terms():
    x0 = torch.rand(SHAPE) * 2 - 1
    noise = torch.randn(SHAPE)
    diffusion = GaussianDiffusion()
    t = torch.tensor([10, 600])

    def exact(x, tt):  # true noise, and variance at the true posterior's (frac = 0 -> min_log)
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    terms = diffusion.training_losses(exact, x0, t=t, noise=noise)
    assert terms["mse"].abs().max() < 1e-10 and terms["vb"].abs().max() < 1e-5
    off = diffusion.training_losses(lambda x, tt: torch.cat([noise, torch.ones_like(noise)], dim=1), x0, t=t, noise=noise)
    assert off["vb"][0] > 1e-3 and (off["vb"] >= 0).all() and torch.allclose(off["loss"], off["mse"] + off["vb"])
    # the variance learns only through vb; the mean only through mse
    out = torch.cat([noise + 0.1, torch.zeros_like(noise)], dim=1).requires_grad_()
    diffusion.training_losses(lambda x, tt: out, x0, t=t, noise=noise)["vb"].sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0
    # t = 0 uses the decoder likelihood: finite and positive bits per dim
    zero = diffusion.training_losses(exact, x0, t=torch.tensor([0, 0]), noise=noise)
    assert zero["vb"].isfinite().all() and (zero["vb"] > 0).all()


def test_gaussian_sampling_with_model_and_guidance():
    model = tiny_model(learn_sigma=True)
    diffusion = GaussianDiffusion("4")
    kwargs = dict(model_kwargs={"y": torch.tensor([2, 3])}, cfg_scale=4.0, progress_bar=False)
    a = diffusion.p_sample_loop(model, (2, 4, 2, 4, 4), generator=torch.Generator().manual_seed(0), **kwargs)
    b = diffusion.p_sample_loop(model, (2, 4, 2, 4, 4), generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(a, b) and a.isfinite().all()
    d = diffusion.ddim_sample_loop(model, (2, 4, 2, 4, 4), generator=torch.Generator().manual_seed(0), **kwargs)
    assert d.isfinite().all() and not torch.allclose(a, d)
    with pytest.raises(ValueError, match="2C"):
        GaussianDiffusion("4").p_sample_loop(tiny_model(learn_sigma=False), (1, 4, 2, 4, 4), progress_bar=False,
                                             model_kwargs={"y": torch.tensor([1])})
    assert math.isfinite(float(diffusion.training_losses(model, torch.randn(2, 4, 2, 4, 4),
                                                         {"y": torch.tensor([0, 1])})["loss"].mean().detach()))


class ImageDiT(torch.nn.Module):
    """The reference DiT seen as a one-frame video model: (B, C, 1, H, W) in and out."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, x, t, y):
        return self.dit(x[:, :, 0], t, y)[:, :, None]

    def forward_with_cfg(self, x, t, y, cfg_scale):
        # DiT's sample.py labels: the second half of the doubled batch is the null class
        y = torch.cat([y[: len(y) // 2], torch.full_like(y[len(y) // 2:], self.dit.y_embedder.num_classes)])
        return self.dit.forward_with_cfg(x[:, :, 0], t, y, cfg_scale)[:, :, None]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_loaded_checkpoint_samples_like_reference_dit(sampler):
    from dit_fast.models import load_dit_checkpoint

    ref = R.randomize_(R.DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                             num_classes=10), std=0.05).eval()
    model = load_dit_checkpoint(ref.state_dict(), num_heads=2, backend="torch")
    diffusion = GaussianDiffusion("5")
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    kwargs = dict(model_kwargs={"y": torch.tensor([3, 7])}, cfg_scale=4.0, progress_bar=False)
    ours = loop(model, (2, 4, 1, 4, 4), generator=torch.Generator().manual_seed(0), **kwargs)
    theirs = loop(ImageDiT(ref), (2, 4, 1, 4, 4), generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
