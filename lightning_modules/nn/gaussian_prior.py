"""An analytic prior: every audio sample of source k is N(mean_k, std_k^2), independently.

It keeps the prior contract (``log_prob(x: [B, N, T]) -> [B, N]`` in nats per sample, ``noise_sigma``,
``score(x, sigma)``, ``denoise(x, sigma)``)
and its noisy version is exact: x + N(0, sigma^2) is N(mean_k, std_k^2 + sigma^2). The posterior of a
linear mixture under it is Gaussian in closed form (``posterior``), which is what the Langevin tests
check the samplers against.
"""
import math

import torch
from torch import nn


class GaussianPrior(nn.Module):
    def __init__(self, means, stds, noise_sigma=0.0):
        super().__init__()
        means, stds = torch.as_tensor(means, dtype=torch.float64), torch.as_tensor(stds, dtype=torch.float64)
        if means.shape != stds.shape or means.dim() != 1:
            raise ValueError("means and stds must be two vectors of the same length, one entry per source")
        if not (stds > 0).all():
            raise ValueError(f"stds must be positive, got {stds.tolist()}")
        self.noise_sigma = float(noise_sigma)
        self.register_buffer("means", means.float())
        self.register_buffer("variances", (stds**2 + self.noise_sigma**2).float())
        self.register_buffer("clean_variances", (stds**2).float())

    def denoise(self, x, sigma):
        """E[x_clean | x] for x = x_clean + N(0, sigma^2): the exact denoiser of this prior at ``sigma``
        (a float, or a tensor broadcastable to [B, N])."""
        var, mean = self.clean_variances.view(1, -1, 1), self.means.view(1, -1, 1)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.view(*sigma.shape, *([1] * (3 - sigma.dim()))) if sigma.dim() else sigma
        return mean + var / (var + sigma**2) * (x - mean)

    def score(self, x, sigma):
        """grad_x log p_sigma(x) [B, N, T] of the clean prior convolved with N(0, sigma^2)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.view(*sigma.shape, *([1] * (3 - sigma.dim()))) if sigma.dim() else sigma
        return (self.denoise(x, sigma) - x) / sigma**2

    def log_prob(self, x):
        if x.dim() != 3 or x.shape[1] != len(self.means):
            raise ValueError(f"expected audio of shape [batch, {len(self.means)}, time], got {tuple(x.shape)}")
        var, mean = self.variances.view(1, -1, 1), self.means.view(1, -1, 1)
        log_density = -0.5 * ((x - mean) ** 2 / var + torch.log(2 * math.pi * var))
        return log_density.mean(dim=2)

    def posterior(self, mix, alpha, gamma):
        """Exact p(s | m) for m = sum_k alpha_k s_k + N(0, gamma^2), per time step.

        Returns the posterior means [..., N, T] and the covariance [N, N] (the same at every step):
        Sigma = (V^-1 + a a^T / gamma^2)^-1, mu = Sigma (V^-1 mean + a m / gamma^2).
        """
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        precision = torch.diag(1 / self.variances.double()) + torch.outer(alpha, alpha) / gamma**2
        covariance = torch.linalg.inv(precision)
        prior_term = (self.means.double() / self.variances.double()).unsqueeze(-1)  # [N, 1]
        data_term = alpha.unsqueeze(-1) * mix.double().unsqueeze(-2) / gamma**2  # [..., N, T]
        return covariance @ (prior_term + data_term), covariance
