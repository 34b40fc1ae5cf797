"""A beam over partial code tuples: the candidates of one latent step of the LQ-VAE's posterior for N > 2
sources (lightning_modules/samplers/latent_posterior.py), chosen with the mixture in view.

The exact posterior over the K^N tuples (z_1, ..., z_N) of one step is out of reach for N > 2. The top-k
approximation keeps each source's most probable codes under its prior alone, before the mixture is seen:
when the right code of a source is outside its top k, no likelihood can bring it back. The beam assigns the
sources one at a time instead: every kept partial tuple (z_1, ..., z_j) is extended by each of source j+1's
K codes, the extensions are scored, and the ``width`` best are kept. After the N-th source the beam holds
``width`` full tuples, from which the step samples (by their full posterior score, as for the top-k set).

The score of a partial tuple estimates its MARGINAL posterior, the unassigned sources summed out:

    log p(z_1..z_j | m_s) ~ sum_{i<=j} log p_i(z_i) + log N(m_s; P_j + mu_j, sigma^2 I + diag(v_j))

with P_j = sum_{i<=j} alpha_i e_{z_i} the partial weighted sum, and mu_j, v_j the mean and per-dimension
variance of the unassigned sources' contribution sum_{i>j} alpha_i e_{z_i} under their priors at this step
(the sources independent given their pasts; the sum moment-matched to a diagonal Gaussian). Why this score:

* sampling needs the prefixes that carry most of the posterior's mass, which is what the marginal measures;
  a best-completion bound (max over the unassigned codes) would need a K^(N-j) search per prefix, and its
  cheap admissible relaxations (a prior-only bound, or a box around the reachable sums) hardly see the
  mixture until the last source;
* it sees the mixture at every level: a prefix whose sum leaves a residual the other sources are unlikely
  to fill, given what their priors expect now, drops out early;
* at the last level nothing is unassigned (mu = 0, v = 0) and it is the full tuple's posterior score;
* terms shared by every prefix of one level (the normaliser of the Gaussian; the unassigned sources' prior,
  which sums out to 1) cannot change the ranking and are left out.

It is not admissible (not an upper bound on the best completion): a narrow beam may lose the best tuple. A
width of K^(N-1) keeps every prefix of N-1 sources, and then the beam is exhaustive search
(tests/test_latent_beam.py). The likelihood is the relaxed one of the top-k approximation: the distance of
the UNquantised weighted sum to m_s (re-quantising width x K extensions per level would be a K-way search
each). Cost per step and candidate: N levels of a [width, D] x [D, K] product and a top-``width`` over
width x K scores.
"""
import torch


def remaining_moments(log_priors, codebook, alpha):
    """Mean and variance of sum_{i>j} alpha_i e_{z_i}, z_i ~ p_i, for every level j: [M, N, D] each (level j
    is the contribution of the sources after j; the last level's is zero)."""
    probs = log_priors.exp()
    mean = probs @ codebook  # [M, N, D]
    variance = (probs @ codebook.pow(2) - mean.pow(2)).clamp(min=0)
    weighted_mean, weighted_variance = alpha[:, None] * mean, alpha[:, None].pow(2) * variance

    def after(values):  # sum over the sources after j: a suffix sum, shifted by one
        suffix = values.flip(1).cumsum(1).flip(1)
        return torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], dim=1)

    return after(weighted_mean), after(weighted_variance)


def beam_search(log_priors, mix_code, codebook, alpha, sigma, width):
    """The beam's full tuples at one step. log_priors [M, N, K] (each source's next-code log-probabilities),
    mix_code [M, D], codebook [K, D], alpha [N] -> code indices [M, W, N], W = min(width, K^N), best first."""
    if width < 1:
        raise ValueError(f"separation.latent_beam must be >= 1 (partial tuples kept per source), got {width}")
    # float32 even under autocast: a matmul there would run in bf16, too coarse for distances between codes.
    with torch.autocast(device_type=mix_code.device.type, enabled=False):
        log_priors, mix_code = log_priors.float(), mix_code.float()
        codebook, alpha = codebook.float(), alpha.float().to(mix_code.device)
        m, n, k = log_priors.shape
        rest_mean, rest_variance = remaining_moments(log_priors, codebook, alpha)
        code_square = codebook.pow(2)  # [K, D]
        tuples = torch.zeros(m, 1, 0, dtype=torch.long, device=mix_code.device)
        prefix_prior = torch.zeros(m, 1, device=mix_code.device)
        prefix_sum = torch.zeros(m, 1, codebook.shape[1], device=mix_code.device)
        for j in range(n):
            precision = 1.0 / (sigma**2 + rest_variance[:, j])  # [M, D]
            residual = (mix_code - rest_mean[:, j])[:, None] - prefix_sum  # [M, B, D]: what source j should fill
            # ||r - a e_z||^2 weighted by the precision, expanded: a [B, D] x [D, K] product, not [B, K, D].
            weighted = residual * precision[:, None]
            distance = ((weighted * residual).sum(-1, keepdim=True) - 2 * alpha[j] * weighted @ codebook.T
                        + alpha[j] ** 2 * (precision @ code_square.T)[:, None])  # [M, B, K]
            scores = (prefix_prior[:, :, None] + log_priors[:, j, None, :] - distance / 2).flatten(1)
            keep = scores.topk(min(width, scores.shape[1]), dim=1).indices  # [M, W]
            parent, code = keep // k, keep % k
            tuples = torch.cat([tuples.gather(1, parent[..., None].expand(-1, -1, j)), code[..., None]], dim=2)
            prefix_prior = prefix_prior.gather(1, parent) + log_priors[:, j].gather(1, code)
            prefix_sum = (prefix_sum.gather(1, parent[..., None].expand(-1, -1, prefix_sum.shape[2]))
                          + alpha[j] * codebook[code])
        return tuples
