"""Scores a subset of a prior family's sources, e.g. a 2-source mixture with 4-source toy priors.

The priors of a family share one grouped module but are independent, so the unused sources can be
filled with zeros: their log-likelihood is dropped and no gradient reaches the kept sources from them.
It costs the compute of the unused groups, and needs no change to any family.
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

    def log_prob(self, x):
        if self.is_all:
            return self.prior.log_prob(x)
        full = x.new_zeros(x.shape[0], self.n_total, x.shape[2])
        full = full.index_copy(1, self.indices, x)
        return self.prior.log_prob(full)[:, self.indices]
