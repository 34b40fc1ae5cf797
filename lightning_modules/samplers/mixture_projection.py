"""The orthogonal projection onto the mixture's plane: the estimates nearest (L2) to the given ones whose
alpha-weighted sum is exactly m. Each source takes alpha_k / sum_j alpha_j^2 of the residual m - sum_j alpha_j x_j.
The diffusion sampler's ``projected`` constraint applies it after every update; ``separation.mixture_consistency``
applies it to finished estimates."""


def project_to_mixture(mix, estimates, alpha):
    """estimates [..., N, T] moved to the nearest sources whose alpha-weighted sum is mix [..., T]."""
    alpha = alpha.to(estimates.dtype)
    residual = mix - (alpha[:, None] * estimates).sum(dim=-2)
    return estimates + (alpha / alpha.pow(2).sum())[:, None] * residual.unsqueeze(-2)
