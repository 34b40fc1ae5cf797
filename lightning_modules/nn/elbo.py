"""The ELBO of the variational separator (thesis eq. 53), term by term, in nats per audio sample:

    ELBO(m) = sum_k E_q[log p_k(s_k)] + sum_k H[q_k(. | m)] + E_q[log N(m; g(s), gamma^2 I)]

with g(s) = sum_k alpha_k s_k. Per term:

* prior: one reparameterised sample per source, scored by the frozen prior (``log_prob``, nats per
  sample). A family whose likelihood is an ODE solve (score priors) gives instead a surrogate with the
  same gradient, ``<score(s, sigma), s> / T`` with the score held constant; its value is not a
  log-likelihood and is reported as NaN.
* entropy: exact (the posterior's closed form), averaged over samples.
* mixture: exact; 0 under the Dirac likelihood (a posterior with ``exact_mixture``, whose samples sum to m).
  Otherwise q factorises over sources and samples, so
  E||m - g(s)||^2 = ||m - g(E s)||^2 + sum_k alpha_k^2 Var(s_k) at every sample.
"""
import math

import torch


def prior_term(prior, samples, score_sigma=None):
    """([B, N] value, [B, N] differentiable objective) of the prior term for ``samples`` [B, N, T]."""
    if score_sigma is None:
        value = prior.log_prob(samples).float()
        return value, value
    score = prior.score(samples.detach(), score_sigma).detach()
    surrogate = (score * samples).mean(dim=2)
    return torch.full_like(surrogate, math.nan), surrogate


def mixture_term(posterior, mix, alpha, gamma):
    """E_q[log N(m; g(s), gamma^2 I)] per sample [B], exactly."""
    alpha = alpha.to(mix).view(1, -1, 1)
    residual = mix - (alpha * posterior.mean).sum(dim=1)
    expected = residual.pow(2) + (alpha.pow(2) * posterior.variance).sum(dim=1)
    return -(expected / (2 * gamma**2)).mean(dim=1) - 0.5 * math.log(2 * math.pi * gamma**2)


def elbo_value(terms):
    """The ELBO [B] of ``elbo_terms``' output: every term at weight 1."""
    return terms["prior"].sum(dim=1) + terms["entropy"].sum(dim=1) + terms["mixture"]


def elbo_terms(posterior, prior, mix, alpha, gamma, uniform, score_sigma=None):
    """{"prior", "prior_objective", "entropy": [B, N]; "mixture": [B]; "samples": [B, N, T]}.

    ``uniform`` [B, N, T] in (0, 1) drives the reparameterised sample (the caller seeds it)."""
    samples = posterior.rsample(uniform)
    value, objective = prior_term(prior, samples, score_sigma)
    if getattr(posterior, "exact_mixture", False):  # the Dirac likelihood: g(s) = m for every sample
        mixture = torch.zeros(mix.shape[0], device=mix.device)
    else:
        mixture = mixture_term(posterior, mix.float(), alpha, gamma)
    return {"prior": value, "prior_objective": objective, "entropy": posterior.entropy().float().mean(dim=2),
            "mixture": mixture, "samples": samples}
