"""Separation with the trained amortised posterior q(s | m) (``separation.algorithm=variational``): one
forward pass of the posterior network per mixture, no iterations.

It is a sampler for the separation test loop (lightning_modules/separation.py): ``forward`` returns C
posterior samples per mixture (each mixture's from its own seeded generator), and its point estimate, the
posterior mean E_q[s] (for the truncated normal not its location parameter), is a row of its own
(``variational_mean``), returned in the trace as ``point_estimates``. The trace has one step: the mixture
error of the samples.

``VariationalInit`` gives the same samples as the starting point of another sampler
(``separation.init=variational``).
"""
import math

import torch
from torch import nn


def posterior_samples(posterior, n_chains, seeds):
    """[B, C, N, T] samples of ``posterior`` (a distribution [B, N, T]), mixture b's from seed b."""
    shape, device = posterior.loc.shape[1:], posterior.loc.device
    uniforms = [torch.rand((n_chains, *shape), generator=torch.Generator(device=device).manual_seed(int(s)),
                           device=device) for s in seeds]
    # [C, B, N, T] broadcasts against the posterior's [B, N, T] parameters.
    return posterior.rsample(torch.stack(uniforms, dim=1)).transpose(0, 1)


class VariationalSeparator(nn.Module):
    point_estimate_names = ("mean",)
    n_steps = 1
    trace_sigmas = [0.0]

    def __init__(self, posterior_module, selection_prior):
        super().__init__()
        self.posterior_module = posterior_module
        self.score_model = selection_prior  # ranks the samples (the prior the posterior was trained against)
        self.register_buffer("alpha", posterior_module.alpha.clone())
        self.nonfinite_steps = 0

    @torch.no_grad()
    def forward(self, mix, n_chains, seeds):
        if len(seeds) != mix.shape[0]:
            raise ValueError("one seed per mixture is needed")
        posterior = self.posterior_module.posterior(mix)
        samples = posterior_samples(posterior, n_chains, seeds).float()  # [B, C, N, T]
        residual = mix.float().unsqueeze(1) - (self.alpha.view(1, 1, -1, 1) * samples).sum(dim=2)
        mix_error = residual.pow(2).mean(dim=(1, 2)).unsqueeze(1)
        return samples, {"loglik": torch.full_like(mix_error, math.nan), "mix_error": mix_error,
                         "point_estimates": {"mean": posterior.mean.float()}}


class VariationalInit(nn.Module):
    """Starting points [B * C, N, T] for another sampler's chains: samples of the trained posterior."""

    def __init__(self, posterior_module):
        super().__init__()
        self.posterior_module = posterior_module

    @torch.no_grad()
    def forward(self, mix, n_chains, seeds):
        samples = posterior_samples(self.posterior_module.posterior(mix), n_chains, seeds)
        return samples.float().flatten(0, 1)
