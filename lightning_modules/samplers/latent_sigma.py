"""Choosing the latent likelihood's sigma from solo validation crops (``separation.latent_sigma=auto``).

The latent posterior scores a pair of codes by ``log p_1 + log p_2 - ||m_s - B_Q(sum_k alpha_k e_k)||^2 /
(2 sigma^2)``. The squared distances live on the scale of the codebook, which depends on the data and the
training (on the demo Slakh set the median over all pairs is 0.15, so paper 002's sigma = 0.4 made the
mixture term worth half a nat and the posterior almost ignored the mixture). The sigma is therefore chosen
per run: the true code pairs of validation crops are fed to the Transformers (teacher forcing), and the
sigma on the grid that gives the true pair the highest mean step-posterior log-probability wins. That is
the maximum-likelihood choice of the one free parameter of the posterior, made without the test set.

Two sources only: their K^2 pairs are scored exactly by the separator's own ``step_scores``; for more
sources the beam may not hold the true tuple, so its probability is not defined.
"""
import math

import torch

SIGMA_GRID = (0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.4, 1.0)


@torch.no_grad()
def truth_log_posterior(separator, sources, sigmas=SIGMA_GRID, chunk=128):
    """Mean over steps and crops of log p(true pair | mixture, true past) for each sigma.

    ``separator``: a two-source LatentSeparator (its prior, source indices and mixing weights are used);
    ``sources`` [B, 2, T]: solo crops of its two sources. -> {sigma: mean log-probability in nats}."""
    if len(separator.indices) != 2:
        raise ValueError(f"latent_sigma=auto scores every pair exactly, so it needs two sources; got "
                         f"{len(separator.indices)} (pass a number: separation.latent_sigma=0.05)")
    if separator.likelihood != "gaussian":
        raise ValueError("latent_sigma=auto calibrates the Gaussian latent likelihood; with latent_likelihood="
                         f"{separator.likelihood} pass a number, e.g. separation.latent_sigma=0.05")
    prior, indices, alpha = separator.prior, separator.indices.tolist(), separator.alpha
    transformer = prior.transformer
    sources = sources.float()
    batch, _, length = sources.shape
    codes = prior.codes(sources)  # [B, 2, S]
    mix = (alpha.view(1, -1, 1) * sources).sum(1)
    mix_codes = separator.mixture_target(mix).float()  # [B, S, D]: the separator's own m_s
    # The separator restarts the Transformers' context every `context` codes; so does the teacher forcing.
    full = torch.zeros(batch, transformer.n_groups, codes.shape[2], dtype=torch.long, device=sources.device)
    full[:, indices] = codes
    windows = full.split(transformer.cfg.context, dim=2)
    log_priors = torch.cat([transformer(w).float().log_softmax(-1) for w in windows], dim=2)[:, indices]
    log_priors = log_priors.permute(0, 2, 1, 3).flatten(0, 1)  # [B * S, 2, K]
    k = log_priors.shape[-1]
    truth = (codes[:, 0] * k + codes[:, 1]).flatten()  # index of (z_1, z_2) in the row-major pair grid
    mix_codes = mix_codes.flatten(0, 1)
    totals = {sigma: 0.0 for sigma in sigmas}
    original = separator.sigma
    try:
        for start in range(0, truth.shape[0], chunk):
            rows = slice(start, start + chunk)
            for sigma in sigmas:
                separator.set_sigma(sigma)
                _, scores = separator.step_scores(log_priors[rows], mix_codes[rows])
                totals[sigma] += float(scores.log_softmax(dim=-1).gather(1, truth[rows, None]).sum())
    finally:
        separator.set_sigma(original)
    return {sigma: total / truth.shape[0] for sigma, total in totals.items()}


def best_sigma(table):
    """The sigma with the highest mean log-probability (the larger sigma on a tie: the milder likelihood)."""
    finite = {s: v for s, v in table.items() if math.isfinite(v)}
    if not finite:
        raise ValueError("no sigma on the grid gives the true pairs a finite posterior probability")
    return max(finite, key=lambda s: (finite[s], s))
