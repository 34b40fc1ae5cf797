"""Noise-conditional score priors: one EDM denoiser D_k(x, sigma) per source (NCSN / ISDM family).

N independent priors share one grouped module (like the flows): channel k of ``x [B, N, T]`` goes
through prior k only. Each is trained by denoising score matching,

    loss_k = lambda(sigma) || D_k(x_k + sigma eps, sigma) - x_k ||^2 / T,    eps ~ N(0, I),

with sigma drawn per example and prior, log-uniform over [sigma_min, sigma_max] (or EDM's log-normal),
and answers the framework's prior contract:

* ``denoise(x, sigma)`` and ``score(x, sigma) = (D(x, sigma) - x) / sigma^2`` = grad_x log p_sigma(x),
  the score of the data convolved with N(0, sigma^2) (Tweedie), for any sigma in the trained range;
* ``log_prob(x) -> [B, N]``: the exact log-density of p_{sigma_min} in nats per audio sample, by the
  probability-flow ODE (lightning_modules/nn/probability_flow.py); ``likelihood_method`` says how;
* ``selection_score(x) -> [B, N]``: minus the weighted denoising loss at fixed sigmas and fixed noise,
  a cheap stand-in for the likelihood (it is an ELBO up to constants) to rank separation chains;
* ``denoising_losses(x, sigmas)``: the per-sigma denoising loss, for the cross-likelihood study.

sigma_data [N] is measured per source from the training data before the first step (``set_sigma_data``)
and saved with the weights.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from lightning_modules.nn import edm_preconditioning as edm
from lightning_modules.nn.denoiser_net import DenoiserNet
from lightning_modules.nn.unet_denoiser import UNetDenoiser

SIGMA_SAMPLINGS = ("loguniform", "lognormal")
NETS = ("dilated", "unet")
SELECTION_SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class ScoreConfig:
    net: str = "dilated"  # dilated (denoiser_net.py) | unet (unet_denoiser.py, ISDM's shape)
    width: int = 32
    n_layers: int = 10
    kernel_size: int = 3
    squeeze: int = 4  # samples folded into one step of the network (T must be a multiple)
    dilation_cycle: int = 10
    embed_dim: int = 64
    sigma_min: float = 1e-3
    sigma_max: float = 10.0
    sigma_sampling: str = "loguniform"  # loguniform over [sigma_min, sigma_max] | lognormal (EDM P_mean, P_std)
    p_mean: float = -1.2
    p_std: float = 1.2
    ode_divergence: str = "auto"  # exact (short crops) | hutchinson | auto
    ode_tolerance: float = 1e-3  # rtol = atol of the adaptive RK45 solver
    ode_probes: int = 1  # Rademacher probes of the Hutchinson estimate
    # net=unet: one width per level plus the bottleneck's; squeeze is its patch size
    unet_widths: List[int] = field(default_factory=lambda: [32, 64, 96])
    unet_factors: List[int] = field(default_factory=lambda: [4, 4])
    unet_blocks: int = 2
    unet_attention_levels: int = 1  # the lowest levels with self-attention (and the bottleneck when > 0)
    ema_decay: Optional[float] = None  # EMA of the weights per optimizer step (validation, likelihood, separation)


class ScorePrior(nn.Module):
    noise_conditional = True  # one network for every sigma: no fine-tuned copies needed
    training_metric = "dsm_loss"
    has_density_gradient = True

    def __init__(self, n_sources, cfg: ScoreConfig):
        super().__init__()
        if not 0 < cfg.sigma_min < cfg.sigma_max:
            raise ValueError(f"score priors need 0 < sigma_min < sigma_max, got {cfg.sigma_min}, {cfg.sigma_max}")
        if cfg.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"unknown sigma_sampling {cfg.sigma_sampling!r}; choose from {list(SIGMA_SAMPLINGS)}")
        if cfg.net not in NETS:
            raise ValueError(f"unknown model.net {cfg.net!r}; choose from {list(NETS)}")
        if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
            raise ValueError(f"model.ema_decay must be in (0, 1) (or null for no EMA), got {cfg.ema_decay}")
        self.cfg, self.n_sources = cfg, n_sources
        if cfg.net == "unet":
            self.net = UNetDenoiser(n_sources, cfg.unet_widths, cfg.unet_factors, cfg.squeeze, cfg.unet_blocks,
                                    cfg.unet_attention_levels, cfg.embed_dim)
            self.length_multiple = self.net.length_multiple
        else:
            self.net = DenoiserNet(n_sources, cfg.width, cfg.n_layers, cfg.kernel_size, cfg.squeeze,
                                   cfg.dilation_cycle, cfg.embed_dim)
            self.length_multiple = cfg.squeeze
        self.register_buffer("sigma_data", torch.full((n_sources,), 0.5))
        self.register_buffer("sigma_data_measured", torch.zeros((), dtype=torch.bool))

    @property
    def weight_ema_decay(self):
        """The decay of the EMA of the weights that training keeps (fitting.py), or None."""
        return self.cfg.ema_decay

    def set_sigma_data(self, sigma_data):
        self.sigma_data.copy_(torch.as_tensor(sigma_data, dtype=torch.float32).clamp(min=1e-3))
        self.sigma_data_measured.fill_(True)

    def _sigma(self, sigma, x):
        """sigma as a [B, N] float32 tensor (from a float, [B] or [B, N])."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.dim() == 1:
            sigma = sigma.unsqueeze(1)
        return sigma.expand(x.shape[0], x.shape[1])

    def _network(self, x, sigma):
        """(sigma [B, N, 1], sigma_data [1, N, 1], F(c_in x, c_noise) [B, N, T] in float32)."""
        sigma = self._sigma(sigma, x)
        s, sd = sigma.unsqueeze(-1), self.sigma_data.view(1, -1, 1)
        out = self.net((edm.c_in(s, sd) * x).to(x.dtype), edm.c_noise(sigma))
        # Float32 skip path: under bf16 autocast the network is low precision, the identity part is not.
        return s, sd, out.float()

    def denoise(self, x, sigma):
        s, sd, out = self._network(x, sigma)
        return edm.c_skip(s, sd) * x.float() + edm.c_out(s, sd) * out

    def score(self, x, sigma):
        """(D - x) / sigma^2, written as -x / (sigma^2 + sigma_data^2) + c_out F / sigma^2: the same value
        without the cancellation of D - x, which loses digits in float32 as sigma -> 0."""
        s, sd, out = self._network(x, sigma)
        return -x.float() / (s**2 + sd**2) + edm.c_out(s, sd) / s**2 * out

    def sample_sigma(self, shape, generator, device):
        u = torch.rand(shape, generator=generator, device=device)
        if self.cfg.sigma_sampling == "loguniform":
            low, high = math.log(self.cfg.sigma_min), math.log(self.cfg.sigma_max)
            return torch.exp(low + (high - low) * u)
        normal = torch.randn(shape, generator=generator, device=device)
        return torch.exp(self.cfg.p_mean + self.cfg.p_std * normal).clamp(self.cfg.sigma_min, self.cfg.sigma_max)

    def weighted_denoising_loss(self, x, sigma, noise):
        """lambda(sigma) ||D(x + sigma noise, sigma) - x||^2 / T per example and prior [B, N]."""
        s = sigma.unsqueeze(-1)
        denoised = self.denoise(x + s * noise, sigma)
        weight = edm.loss_weight(sigma, self.sigma_data.view(1, -1))
        return weight * (denoised - x.float()).pow(2).mean(dim=2)

    def training_loss(self, x, generator=None):
        sigma = self.sample_sigma(x.shape[:2], generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.weighted_denoising_loss(x, sigma, noise)

    def denoising_losses(self, x, sigmas, seed=0):
        """Unweighted MSE ||D(x + sigma eps, sigma) - x||^2 / T [len(sigmas), B, N], fixed noise per call."""
        generator = torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        losses = []
        for sigma in sigmas:
            denoised = self.denoise(x + sigma * noise, sigma)
            losses.append((denoised - x.float()).pow(2).mean(dim=2))
        return torch.stack(losses)

    def selection_score(self, x):
        """Minus the mean weighted denoising loss over SELECTION_SIGMAS (fixed noise): higher is more likely."""
        # One noise draw shared by every item, so an item's score does not depend on its batch or rank.
        generator = torch.Generator(device=x.device).manual_seed(0)
        total = 0
        for sigma in SELECTION_SIGMAS:
            noise = torch.randn((1, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
            total = total + self.weighted_denoising_loss(x, self._sigma(sigma, x), noise.expand_as(x))
        return -total / len(SELECTION_SIGMAS)

    @property
    def likelihood_method(self):
        cfg = self.cfg
        return (f"probability-flow ODE (RK45, rtol=atol={cfg.ode_tolerance:g}, divergence {cfg.ode_divergence}, "
                f"{cfg.ode_probes} probe(s)), log p at sigma_min={cfg.sigma_min:g}")

    def log_prob(self, x, start_sigma=None):
        """log p_sigma(x) in nats per sample at ``start_sigma`` (default sigma_min: the prior's own density)."""
        from lightning_modules.nn.probability_flow import ode_log_prob

        cfg = self.cfg
        # The divergence needs autograd even when called from an inference-mode test loop.
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().float()
            log_prob, self.last_likelihood_info = ode_log_prob(
                self.denoise, x, start_sigma or cfg.sigma_min, cfg.sigma_max, self.sigma_data,
                divergence=cfg.ode_divergence,
                n_probes=cfg.ode_probes, rtol=cfg.ode_tolerance, atol=cfg.ode_tolerance)
        return log_prob.detach()
