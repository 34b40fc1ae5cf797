"""One noise level of a noise-conditional prior, as a prior of its own.

The likelihood families (flows, WaveNets) are fine-tuned on x + N(0, sigma^2) for each sigma of the
cross-likelihood study, so "the model at sigma_model" is a copy that approximates p_sigma = p_data * N(0,
sigma^2 I). A noise-conditional family (the score priors) has one network for every sigma and gives
p_sigma itself: ``NoiseLevelView(prior, sigma).log_prob(x)`` is log p_sigma(x) in nats per audio sample,
by the same probability-flow ODE as ``prior.log_prob`` started at max(sigma, sigma_min) instead of
sigma_min (below sigma_min the network was never trained, and p_sigma_min is the prior's own density).
"""
import math

from torch import nn


def ode_method(cfg, level="sigma"):
    """How the view computes log p_sigma, for the reports (cfg: the prior's ScoreConfig)."""
    return (f"probability-flow ODE (RK45, rtol=atol={cfg.ode_tolerance:g}, divergence {cfg.ode_divergence}, "
            f"{cfg.ode_probes} probe(s)), log p_sigma started at {level}")


class NoiseLevelView(nn.Module):
    """``log_prob(x) -> [B, N]`` = log p_sigma(x) of a noise-conditional ``prior`` at one level sigma >= 0."""

    noise_conditional = False  # a view is one fixed level, like a fine-tuned copy

    def __init__(self, prior, sigma):
        super().__init__()
        if not getattr(prior, "noise_conditional", False):
            raise TypeError(f"{type(prior).__name__} is not noise-conditional: fine-tune a copy per sigma instead")
        sigma = float(sigma)
        if not (math.isfinite(sigma) and 0 <= sigma < prior.cfg.sigma_max):
            raise ValueError(f"a noise level view needs 0 <= sigma < sigma_max={prior.cfg.sigma_max:g}, got {sigma!r}")
        self.prior = prior
        self.noise_sigma = sigma
        self.length_multiple = getattr(prior, "length_multiple", 1)
        self.last_likelihood_info = None

    @property
    def ode_sigma(self):
        """The sigma the ODE starts at: the level, or sigma_min below the trained range."""
        return max(self.noise_sigma, self.prior.cfg.sigma_min)

    @property
    def likelihood_method(self):
        return ode_method(self.prior.cfg, f"sigma={self.ode_sigma:g}")

    def denoising_losses(self, x, sigmas, seed=0):
        return self.prior.denoising_losses(x, sigmas, seed=seed)

    def log_prob(self, x):
        log_prob = self.prior.log_prob(x, start_sigma=self.ode_sigma)
        self.last_likelihood_info = self.prior.last_likelihood_info
        return log_prob
