"""The score contract for likelihood priors fine-tuned at noise levels (flows, smoothed WaveNet, GaussianPrior).

Every sampler (BASIS, SGLD, diffusion) asks one thing of a prior family:

    score(x: [M, N, T], sigma) -> [M, N, T] = grad_x log p_sigma(x),

the gradient of the *total* log-density (a sum over the T samples) of source channel k under prior k,
with p_sigma the data convolved with N(0, sigma^2). A noise-conditional score network answers it for
any sigma itself. A likelihood family has one prior per fine-tuned noise level instead, each with
``log_prob(x) -> [M, N]`` in nats per audio sample (a mean over T); ``LevelScore`` puts those behind the
same contract: the prior registered for ``sigma`` (exactly, else the nearest in log-sigma) and the
autograd gradient of ``T * log_prob``.
"""
import math

import torch
from torch import nn

NOISELESS_AS = 1e-4  # the noiseless prior's place on the log-sigma axis


def log_distance(a, b):
    """Distance in log-sigma; the noiseless prior counts as sigma = 1e-4."""
    return abs(math.log(max(a, NOISELESS_AS)) - math.log(max(b, NOISELESS_AS)))


def as_float_sigma(sigma):
    """One sigma for the whole batch: a likelihood family has one prior per level, not one per example."""
    if torch.is_tensor(sigma):
        values = sigma.detach().flatten()
        if values.numel() == 0 or not bool((values == values[0]).all()):
            raise ValueError(f"a likelihood prior serves one sigma per call, got {sigma.tolist()}")
        sigma = values[0].item()
    return float(sigma)


class LevelScore(nn.Module):
    """``levels``: pairs (sigma, prior): the sigma a sampler asks for -> the prior that serves it.

    One prior may serve several sigmas (e.g. `separation.prior_levels=nearest`); it is kept once per pair
    in ``priors``, parallel to ``sigmas``. ``last_log_prob`` [M, N] is the detached per-sample log-lik of
    the last ``score`` call, which the Langevin trace plots.
    """

    def __init__(self, levels):
        super().__init__()
        levels = [(float(sigma), prior) for sigma, prior in levels]
        if not levels:
            raise ValueError("LevelScore needs at least one (sigma, prior) pair")
        sigmas = [sigma for sigma, _ in levels]
        if any(not math.isfinite(s) or s < 0 for s in sigmas) or len(set(sigmas)) != len(sigmas):
            raise ValueError(f"LevelScore needs distinct finite sigmas >= 0, got {sigmas}")
        self.sigmas = sigmas
        self.priors = nn.ModuleList(prior for _, prior in levels)
        self.last_log_prob = None

    def prior_for(self, sigma):
        """The prior registered for ``sigma``: an exact match, else the nearest in log-sigma."""
        sigma = as_float_sigma(sigma)
        if sigma in self.sigmas:
            return self.priors[self.sigmas.index(sigma)]
        nearest = min(range(len(self.sigmas)), key=lambda i: log_distance(self.sigmas[i], sigma))
        return self.priors[nearest]

    def score(self, x, sigma):
        prior = self.prior_for(sigma)
        # The gradient is needed even inside a no_grad caller (separate_file); x itself is left alone.
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_prob = prior.log_prob(x_in)
            (grad,) = torch.autograd.grad(log_prob.sum() * x.shape[-1], x_in)
        self.last_log_prob = log_prob.detach().float()
        return grad.to(x.dtype)

    def denoise(self, x, sigma):
        """Tweedie: E[x_0 | x_sigma] = x + sigma^2 * score(x, sigma)."""
        return x + as_float_sigma(sigma) ** 2 * self.score(x, sigma)

    def log_prob(self, x):
        """The smallest sigma's prior: the one closest to the clean data."""
        return self.priors[min(range(len(self.sigmas)), key=self.sigmas.__getitem__)].log_prob(x)

    @property
    def length_multiple(self):
        """Audio lengths every registered prior accepts."""
        return math.lcm(*(int(getattr(prior, "length_multiple", 1)) for prior in self.priors))
