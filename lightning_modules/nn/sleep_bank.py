"""Mixtures drawn from the generative model itself, for the sleep phase of wake-sleep (Hinton et al. 1995;
Bornschein & Bengio 2015): sources from the priors, the mixture from the likelihood.

A bank holds M unconditional draws of every source's prior ([M, N, T], lightning_modules/samplers/
prior_sampling.py). A batch picks, per example and source, an independent bank row and crop offset, so the
sources of one mixture are independent as the model says, and M draws make M^N distinct mixtures.

    s_k = bank[i_k, k, t_k : t_k + L],   m = sum_k alpha_k s_k (+ gamma eps under the Gaussian likelihood)

No training example enters: the posterior trained on these pairs learns p(s | m) of the model, from the
priors alone.
"""
import torch


class SleepBank:
    def __init__(self, draws):
        if draws.dim() != 3 or draws.shape[0] < 1:
            raise ValueError(f"a sleep bank needs draws of shape [draws, sources, time], got {tuple(draws.shape)}")
        self.draws = draws

    def batch(self, size, length, alpha, generator, gamma=0.0):
        """(sources [size, N, length], mix [size, length]) on the bank's device."""
        count, n_sources, total = self.draws.shape
        if length > total:
            raise ValueError(f"the sleep bank's draws are {total} samples long; crops of {length} need longer draws")
        rows = torch.randint(count, (size, n_sources), generator=generator)
        offsets = torch.randint(total - length + 1, (size, n_sources), generator=generator)
        window = offsets.unsqueeze(-1) + torch.arange(length)  # [size, N, length]
        sources = self.draws[rows.unsqueeze(-1), torch.arange(n_sources).view(1, -1, 1), window]
        mix = (alpha.to(sources).view(1, -1, 1) * sources).sum(dim=1)
        if gamma > 0:
            mix = mix + gamma * torch.randn(mix.shape, generator=generator).to(mix)
        return sources, mix
