"""Separation by Langevin dynamics: BASIS (paper 004 Alg. 1) and plain SGLD (paper 003 App. 5.1).

The model of a mix: ``m = g(x) + N(0, gamma^2 I)`` with the linear mixing ``g(x) = sum_k alpha_k x_k``
and independent priors ``p_k(x_k)``. A Langevin step samples the posterior p(x | m):

    x <- x + eta * grad_x log p(x | m) + sqrt(2 eta) * eps,     eps ~ N(0, I)

Mixture-term constant. ``log N(m; g(x), gamma^2 I) = -||m - g(x)||^2 / (2 gamma^2) + const`` and
``d g(x) / d x_k = alpha_k I``, hence

    grad_{x_k} log p(m | x) = alpha_k * (m - g(x)) / gamma^2.

* mean mixing (the toy data, ``m = (1/N) sum_k x_k``): alpha_k = 1/N, the step adds
  ``(eta / gamma^2) * (1/N) * (m - mean_k x_k)`` to every source;
* sum mixing (``m = sum_k x_k``): alpha_k = 1, the step adds ``(eta / gamma^2) * (m - sum_k x_k)``;
* any other weights: ``(eta / gamma^2) * alpha_k * (m - g(x))``.

Paper 004's listing prints this term with a minus sign in front of ``(m - g(x))`` and paper 003's
listing drops alpha_k; both ascend the same log-density written here. BASIS sets gamma = sigma_i at
level i, so ``eta_i / gamma_i^2 = delta / sigma_L^2`` is the same at every level.

The prior term is ``score_model.score(x, sigma_i)``, the gradient of the total log-density of the
prior at level i (for a likelihood prior in nats per sample, ``T * grad(mean)``: see
lightning_modules/samplers/level_score.py). Both gradients are taken at the current x, as in a plain Langevin step.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_modules.samplers.draws import per_mixture_draws

@dataclass(frozen=True)
class Level:
    """One stage of the sampler: the prior fine-tuned at ``sigma``, step size, mixture std, steps."""
    sigma: float
    eta: float
    gamma: float
    steps: int


def basis_levels(sigmas, delta=2e-5, steps=100):
    """Paper 004 Alg. 1: sigmas from largest to smallest; eta_i = delta sigma_i^2 / sigma_L^2; gamma = sigma."""
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(s <= 0 for s in sigmas) or sigmas != sorted(sigmas, reverse=True):
        raise ValueError(f"BASIS needs positive noise levels from largest to smallest, got {sigmas}")
    if delta <= 0 or steps < 1:
        raise ValueError(f"BASIS needs delta > 0 and steps >= 1, got delta={delta}, steps={steps}")
    smallest = sigmas[-1]
    return [Level(s, delta * s**2 / smallest**2, s, steps) for s in sigmas]


def sgld_levels(eta, gamma, steps, prior_sigma=0.0):
    """Paper 003 App. 5.1: one fixed step size and mixture std, one prior."""
    if eta <= 0 or gamma <= 0 or steps < 1:
        raise ValueError(f"SGLD needs eta > 0, gamma > 0 and steps >= 1, got {eta}, {gamma}, {steps}")
    return [Level(float(prior_sigma), float(eta), float(gamma), int(steps))]


class LangevinSeparator(nn.Module):
    """Runs the levels in order, asking ``score_model.score(x, level.sigma)`` for the prior term.

    ``score_model`` is any family behind the score contract (lightning_modules/samplers/level_score.py): a
    ``LevelScore`` of fine-tuned likelihood priors, an analytic prior, a noise-conditional score network.
    The trace's log-likelihood is the model's ``last_log_prob`` when it keeps one, else NaN.

    All mixtures and chains of a call move together as one batch [B * C, N, T]; the only Python loop
    inside a step draws each mixture's noise from its own generator, so a mixture's result does not
    depend on which other mixtures share its batch or its DDP rank.
    """

    def __init__(self, score_model, levels, alpha, init_range=1.0):
        super().__init__()
        if not levels:
            raise ValueError("at least one level is needed")
        self.score_model = score_model
        self.levels = list(levels)
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32))
        self.init_range = init_range
        self.initializer = None  # (mix, n_chains, seeds) -> [B * C, N, T] starting points (separation.init)
        self.nonfinite_steps = 0

    @property
    def n_steps(self):
        return sum(level.steps for level in self.levels)

    @property
    def trace_sigmas(self):
        """The prior's sigma at each step (one trace entry per step)."""
        return [level.sigma for level in self.levels for _ in range(level.steps)]

    def forward(self, mix, n_chains, seeds):
        """mix [B, T] -> estimates [B, C, N, T], trace {"loglik", "mix_error"} each [B, steps].

        ``trace["loglik"]``: mean per-sample log-lik under the current level's prior (over chains and
        sources), NaN for a model without one; ``trace["mix_error"]``: mean squared ||m - g(x)||^2 / T
        over chains, before each step.
        """
        batch, length = mix.shape
        n_sources = len(self.alpha)
        if len(seeds) != batch:
            raise ValueError("one seed per mixture is needed")
        per_mixture = per_mixture_draws(seeds, (n_chains, n_sources, length), mix.device)

        # Paper 004: x_0 ~ Uniform over the signal range, unless another method gives the start.
        if self.initializer is not None:
            x = self.initializer(mix, n_chains, seeds).float()
        else:
            x = self.init_range * (2 * per_mixture(torch.rand) - 1)  # [B * C, N, T]
        target = mix.float().repeat_interleave(n_chains, dim=0).unsqueeze(1)  # [B * C, 1, T]
        alpha = self.alpha.view(1, -1, 1)
        logliks, errors = [], []
        no_loglik = torch.full((x.shape[0],), math.nan, device=mix.device)
        nonfinite = torch.zeros((), dtype=torch.long, device=mix.device)
        for level in self.levels:
            for _ in range(level.steps):
                grad = self.score_model.score(x, level.sigma)
                log_prob = getattr(self.score_model, "last_log_prob", None)
                # A diverging prior gradient would turn the chain into NaN for good: skip its step.
                # (Counted on the device: no host sync inside the loop.)
                finite = torch.isfinite(grad).flatten(1).all(dim=1)
                nonfinite = nonfinite + (~finite).sum()
                grad = torch.where(finite.view(-1, 1, 1), grad, torch.zeros_like(grad))
                residual = target - (alpha * x).sum(dim=1, keepdim=True)
                logliks.append(no_loglik if log_prob is None else log_prob.nan_to_num(nan=-math.inf).mean(dim=1))
                errors.append(residual.pow(2).mean(dim=(1, 2)))
                noise = per_mixture(torch.randn)
                x = (x + level.eta * grad + math.sqrt(2 * level.eta) * noise
                     + (level.eta / level.gamma**2) * alpha * residual)
        self.nonfinite_steps = int(nonfinite)
        trace = {
            "loglik": torch.stack(logliks, dim=1).view(batch, n_chains, -1).mean(dim=1),
            "mix_error": torch.stack(errors, dim=1).view(batch, n_chains, -1).mean(dim=1),
        }
        return x.view(batch, n_chains, n_sources, length), trace
