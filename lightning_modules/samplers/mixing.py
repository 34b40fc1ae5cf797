"""The mixing weights alpha of m = sum_k alpha_k s_k that every sampler and the posterior share: the toy data
averages its sources, musdb18 and Slakh2100 sum their stems."""
import torch

MIXINGS = ("mean", "sum")


def mixing_weights(kind, n_sources, weights=None):
    """alpha [N] for ``kind`` 'mean' or 'sum', or explicit ``weights`` (one per source)."""
    if weights is not None:
        alpha = torch.as_tensor(list(weights), dtype=torch.float32)
        if alpha.shape != (n_sources,) or not torch.isfinite(alpha).all() or not (alpha != 0).all():
            raise ValueError(f"mixing weights must be {n_sources} finite non-zero numbers, got {list(weights)}")
        return alpha
    if kind == "mean":
        return torch.full((n_sources,), 1.0 / n_sources)
    if kind == "sum":
        return torch.ones(n_sources)
    raise ValueError(f"unknown mixing {kind!r}; choose from {list(MIXINGS)} or give explicit weights")
