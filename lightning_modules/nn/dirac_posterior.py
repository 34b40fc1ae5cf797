"""The variational posterior under the Dirac mixture likelihood (``posterior.derived``): q models N - 1 free
sources and the derived source d is what the mixture leaves,

    s_d = (m - sum_{k != d} alpha_k s_k) / alpha_d,

so every sample sums to the mixture exactly and the mixture term (and its gamma) drops out of the ELBO.
Why: on the four toy sources the diffusion sampler under the same constraint separated when it derived the
square and failed when it derived the triangle (docs/separation.md); the Gaussian mixture term with gamma 0.05
lets the fit drift away from the mixture instead.

The ELBO under this likelihood is E_q[sum_k log p_k(s_k)] + sum_{k != d} H[q_k] (the constant log alpha_d
dropped): the derived source has no entropy of its own. This wrapper gives the interface the ELBO and the
samplers use (``loc``, ``mean``, ``variance``, ``entropy``, ``rsample``); the derived entries of ``entropy``
are zero. The net's distribution for s_d is computed and ignored.
"""
import torch


class DiracPosterior:
    exact_mixture = True  # every sample satisfies g(s) = m: the ELBO has no mixture term

    def __init__(self, base, mix, alpha, derived):
        """``base``: the net's distribution [B, N, T]; ``mix`` [B, T]; ``alpha`` [N]; ``derived``: an index."""
        n_sources = base.loc.shape[-2]
        if not 0 <= derived < n_sources:
            raise ValueError(f"the derived source index must be in [0, {n_sources}), got {derived}")
        self.base, self.derived = base, int(derived)
        self.mix, self.alpha = mix.float(), alpha.float().to(mix.device)
        self.free = torch.ones(n_sources, device=mix.device)
        self.free[self.derived] = 0.0

    @property
    def loc(self):
        return self.base.loc

    def derive(self, x):
        """x [..., N, T] (leading dims ending in the mixture batch) -> the same with source d derived."""
        weights = (self.alpha * self.free).view(-1, 1)
        derived = (self.mix - (weights * x.float()).sum(dim=-2)) / self.alpha[self.derived]
        return torch.where(self.free.view(-1, 1).bool(), x.float(), derived.unsqueeze(-2))

    @property
    def mean(self):
        return self.derive(self.base.mean)  # g is linear, so E[s_d] follows from the free means

    @property
    def variance(self):
        variance = self.base.variance.float() * self.free.view(-1, 1)
        derived = (self.alpha.view(-1, 1).pow(2) * variance).sum(dim=-2) / self.alpha[self.derived] ** 2
        return torch.where(self.free.view(-1, 1).bool(), variance, derived.unsqueeze(-2))

    def entropy(self):
        return self.base.entropy() * self.free.view(-1, 1)

    def rsample(self, uniform):
        return self.derive(self.base.rsample(uniform))
