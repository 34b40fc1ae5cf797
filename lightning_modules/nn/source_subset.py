"""Scores a subset of a prior family's sources, e.g. a 2-source mixture with 4-source toy priors.

The priors of a family share one grouped module but are independent, so the unused sources can be
filled with zeros: their log-likelihood (or score, denoised signal, selection score) is dropped and no
gradient reaches the kept sources from them. It costs the compute of the unused groups, and needs no
change to any family.

``score``, ``denoise`` and ``selection_score`` exist exactly when the wrapped family has them, so a
caller's ``getattr(prior, "selection_score", None)`` sees through the wrapper.
"""
import torch
from torch import nn


class SourceSubset(nn.Module):
    def __init__(self, prior, all_sources, sources):
        super().__init__()
        unknown = [s for s in sources if s not in all_sources]
        if unknown:
            raise ValueError(f"source(s) {unknown} have no prior in this run; the priors are {list(all_sources)}")
        self.prior = prior
        self.n_total = len(all_sources)
        indices = [list(all_sources).index(s) for s in sources]
        self.register_buffer("indices", torch.tensor(indices))
        self.is_all = indices == list(range(self.n_total))  # decided once, not at every Langevin step
        self.noise_sigma = getattr(prior, "noise_sigma", 0.0)
        self.noise_conditional = getattr(prior, "noise_conditional", False)
        self.length_multiple = getattr(prior, "length_multiple", 1)

    def full(self, x):
        """x [B, n_kept, T] -> [B, n_total, T] with zeros for the other sources."""
        if self.is_all:
            return x
        return x.new_zeros(x.shape[0], self.n_total, x.shape[2]).index_copy(1, self.indices, x)

    def kept(self, out):
        """The kept sources' entries of a per-source output ([B, n_total] or [B, n_total, T])."""
        return out if self.is_all else out[:, self.indices]

    def log_prob(self, x):
        return self.kept(self.prior.log_prob(self.full(x)))

    def wrapped(self, name):
        """The family's own method ``name``, or an AttributeError (which makes hasattr/getattr say no)."""
        method = getattr(self.prior, name, None)
        if method is None:
            raise AttributeError(f"{type(self.prior).__name__} has no {name}")
        return method

    def full_sigma(self, sigma):
        """A per-source sigma [B, n_kept] -> [B, n_total] (the other sources' entries are never read)."""
        if self.is_all or not torch.is_tensor(sigma) or sigma.dim() < 2:
            return sigma
        return sigma[:, :1].expand(-1, self.n_total).clone().index_copy(1, self.indices, sigma)

    @property
    def score(self):
        method = self.wrapped("score")
        return lambda x, sigma: self.kept(method(self.full(x), self.full_sigma(sigma)))

    @property
    def denoise(self):
        method = self.wrapped("denoise")
        return lambda x, sigma: self.kept(method(self.full(x), sigma))

    @property
    def selection_score(self):
        method = self.wrapped("selection_score")
        return lambda x: self.kept(method(self.full(x)))
