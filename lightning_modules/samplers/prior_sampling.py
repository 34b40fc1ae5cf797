"""Unconditional samples of the priors, for the sleep phase's bank (experiments/train_posterior.py).

A flow prior (FloWaveNet) samples exactly: base noise at a temperature, then the inverse flow
(``sample_flow_prior``).

A noise-conditional score prior: EDM's stochastic sampler (Karras et al. 2022,
algorithm 2) run per source with no mixture, from the prior's largest trained sigma down to its smallest,
then one last denoising step to sigma 0.

    x_0 ~ N(0, sigma_0^2 I);  per level: churn the noise up to sigma_hat = sigma (1 + gamma), a Heun step
    from sigma_hat to the next sigma along dx/dsigma = (x - D(x, sigma)) / sigma

The churn matters on the toy priors: the deterministic ODE (churn 0) gives samples at about half the data's
loudness, some near silent (docs/variational.md, the sleep phase).

Unlike DiffusionSeparator, sigma_hat is not capped at the trained sigma_max: the first level asks the network
at sigma_max (1 + gamma) (7.07 for the toy priors' 5 at churn 40 over 50 levels). The sleep banks of
docs/variational.md were drawn so; capping it changes the draws and was not measured.
"""
import math

import torch

from lightning_modules.samplers.diffusion import karras_sigmas, largest_trained_sigma


def sample_score_prior(prior, n, n_sources, length, generator, steps=50, churn=40.0, sigma_max=None,
                       sigma_min=None, batch_size=64):
    """``n`` draws [n, n_sources, length] of every source's prior (independent across sources), made in
    batches of ``batch_size`` from ``generator`` alone (the same generator state gives the same draws)."""
    if n < 1 or steps < 2 or churn < 0:
        raise ValueError(f"need n >= 1, steps >= 2 and churn >= 0, got {n}, {steps}, {churn}")
    if sigma_max is None:
        sigma_max, _ = largest_trained_sigma(prior)
        if sigma_max is None:
            raise ValueError("this prior has no trained sigma_max: pass sigma_max")
    if sigma_min is None:
        sigma_min = float(prior_config(prior).sigma_min)
    sigmas = karras_sigmas(sigma_max, sigma_min, steps)
    gamma = min(churn / steps, math.sqrt(2) - 1)  # EDM's cap keeps the added noise below the current level
    device = next(iter(prior.buffers()), torch.empty(0)).device
    draws = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            shape = (min(batch_size, n - start), n_sources, length)
            x = sigmas[0] * torch.randn(shape, generator=generator).to(device)
            for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
                sigma_hat = sigma * (1 + gamma)
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * torch.randn(shape, generator=generator).to(device)
                slope = (x - prior.denoise(x, sigma_hat)) / sigma_hat
                euler = x + (sigma_next - sigma_hat) * slope
                slope_next = (euler - prior.denoise(euler, sigma_next)) / sigma_next
                x = x + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next)
            draws.append(prior.denoise(x, sigmas[-1]).float().cpu())
    return torch.cat(draws)


def prior_config(prior):
    """The ScoreConfig of a score prior, also through wrappers that keep it as ``.prior`` (SourceSubset)."""
    while prior is not None and not hasattr(prior, "cfg"):
        prior = getattr(prior, "prior", None)
    if prior is None:
        raise ValueError("not a score prior: no sigma_min to end the sampler at; pass sigma_min")
    return prior.cfg


def sample_flow_prior(flow, n, length, generator, temperature=1.0, batch_size=64):
    """``n`` draws [n, n_priors, length] of a FloWaveNet's priors (independent across priors), in batches of
    ``batch_size`` from ``generator`` alone."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    return torch.cat([flow.sample(size, length, temperature, generator).float().cpu() for size in sizes])
