"""Separation in the LQ-VAE's latent domain (paper 002 section 4): the exact posterior over code tuples,
step by step, sampled for many candidates in parallel, then one candidate chosen.

At latent step s, with m_s = B_Q(E(m))_s the quantised latent of the mixture and alpha the mixing weights,

    log p(z_1..z_N | m, past) = sum_k log p_k(z_k | past_k) - || m_s - B_Q(sum_k alpha_k e_{z_k}) ||^2 / (2 sigma^2)

up to a constant ("gaussian"), or only the tuples whose quantised sum IS the mixture's code ("delta", the
paper code's option; a step where no tuple of the candidate set matches falls back to the Gaussian).
For two sources every one of the K^2 pairs is scored: the K x K table of the codes of B_Q(alpha_1 e_i +
alpha_2 e_j) is computed once per codebook (in chunks of rows, so K = 2048 fits: 2048^2 int32 indices,
16 MiB) and rebuilt when the codebook changes. For N > 2 sources K^N tuples are out of reach. The default
``search="beam"`` samples among the ``beam`` tuples of a beam over partial tuples scored with the mixture in
view (latent_beam.py); ``search="topk"``, the earlier approximation, keeps the ``top_k`` most probable codes
of each source's prior alone and samples among their top_k^N tuples. Both score a tuple by the distance of
its UNquantised weighted sum to m_s (re-quantising every tuple would cost a K-way search each). Two sources
always get the exact K^2 posterior.

``target="latent"`` replaces m_s by E(m)_s, the mixture's latent before quantisation, and compares it with
the UNquantised weighted sum of every tuple (two sources too: their quantised sums take only K values, which
would throw away what the unquantised target adds). For four sources the quantised code is one of K values per
step, while the tuple has K^4: on the toy validation crops the true tuple's weighted sum lies at a squared
distance of 0.68 from B_Q(E(m)) but 0.19 from E(m), and a beam of 64 held the true tuple at 1 % of the steps
against 47 % (sigma 0.03, teacher-forced priors; docs/lqvae.md).

The Transformers run with their key/value caches; the C candidates of each mixture are one batch and are
drawn with a generator seeded by the mixture's seed, so they do not depend on batching or sharding.
Mixtures longer than the context are separated in windows of ``window`` codes (default: the whole
``context``), each Transformer cache started afresh. With ``overlap`` = 0 they are consecutive, and a window's
first codes are drawn with no past; with ``overlap`` > 0 each new window is first fed the last ``overlap``
codes already drawn, so every step after the first window sees at least that much past (paper 002's context
covers its whole 3 s chunk).

The separator keeps, per candidate, the prior log-probability of its codes under each source's
Transformer; ``selection`` turns them into the paper's prior-based rejection (alpha_rej = 0: the
candidate the priors like best; alpha_rej > 0 adds the time-domain likelihood with sigma_rej balanced as
in section 4.3), and ``extra_choices`` adds the time-domain consistency choice.

``temperature`` < 1 draws each step from the posterior raised to 1/temperature (1, the paper: the posterior
itself; towards 0, the most probable tuple of every step). ``contrast`` = lambda tilts each source's step prior
by lambda (log p_own - log p_pooled), the pooled prior being the equal mixture of every class prior fed that
source's own past (paper 003's likelihood ratio), and adds the ``class_ratio`` choice. On the demo Slakh guitar
/ bass validation songs neither temperature, overlap nor contrast helped; short windows (8 codes) lifted that
pair above Average and lowered the drum pairs' SDR (docs/real_music.md), so the Slakh preset sets the window
per pair.
"""
import math

import torch
from torch import nn

from lightning_modules.samplers.draws import categorical_draw
from lightning_modules.samplers.latent_beam import beam_search

LIKELIHOODS = ("gaussian", "delta")
SEARCHES = ("beam", "topk")  # how N > 2 sources choose a step's candidate tuples
TARGETS = ("quantised", "latent")  # the mixture's code m_s: B_Q(E(m)) (paper 002) or E(m) unquantised


def pair_sum_table(quantizer, alpha, chunk=64):
    """[K, K] code indices of B_Q(alpha_0 e_i + alpha_1 e_j), computed ``chunk`` rows at a time."""
    codebook = quantizer.codebook.float()
    rows = []
    for start in range(0, codebook.shape[0], chunk):
        sums = alpha[0] * codebook[start:start + chunk, None] + alpha[1] * codebook[None]  # [c, K, D]
        rows.append(quantizer.nearest(sums).to(torch.int32))
    return torch.cat(rows)


class PriorSelection(nn.Module):
    """The selection prior the separation loop asks for ``selection_score``: the per-source scores the
    separator stored for its last candidates (prior log-probabilities, normalised over each mixture's
    candidates, plus the time-domain term when alpha_rej > 0)."""

    def __init__(self, separator):
        super().__init__()
        self.selection_label = (f"code log-probability under the latent priors, normalised over the candidates "
                                f"(paper 002's rejection, alpha = {separator.rejection_alpha:g})")
        self.separator = [separator]  # a list: not a submodule (no second copy in state_dict or .to())

    def selection_score(self, x):
        scores = self.separator[0].last_selection
        if scores is None or scores.shape[0] != x.shape[0]:
            raise RuntimeError("the latent selection scores belong to the separator's last candidates; "
                               "call the separator first")
        return scores


class LatentSeparator(nn.Module):
    extra_choice_names = ("consistent",)

    def __init__(self, prior, source_indices, alpha, length, sigma=0.4, likelihood="gaussian", top_k=None,
                 rejection_alpha=0.0, search="beam", beam=64, target="quantised", temperature=1.0, overlap=0,
                 window=None, contrast=None):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"separation.latent_temperature must be > 0 (1 samples the posterior itself), "
                             f"got {temperature}")
        if contrast is not None and not contrast >= 0:
            raise ValueError(f"separation.latent_contrast must be >= 0 (or null: off), got {contrast}")
        if target not in TARGETS:
            raise ValueError(f"unknown separation.latent_target {target!r}; choose from {list(TARGETS)}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown separation.latent_likelihood {likelihood!r}; choose from {list(LIKELIHOODS)}")
        if search not in SEARCHES:
            raise ValueError(f"unknown separation.latent_search {search!r}; choose from {list(SEARCHES)}")
        if search == "beam" and not (beam is not None and int(beam) >= 1):
            raise ValueError(f"separation.latent_beam must be >= 1 (partial tuples kept per source), got {beam}")
        if len(source_indices) > 2 and search == "topk" and not top_k:
            raise ValueError(f"{len(source_indices)} sources have K^{len(source_indices)} joint codes: set "
                             f"separation.latent_top_k (e.g. 8) for the top-k approximation, or latent_search=beam")
        context = prior.transformer.cfg.context
        window = context if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= context:
            raise ValueError(f"separation.latent_window must be in [1, {context}] (the Transformers' context), "
                             f"got {window}")
        if not 0 <= int(overlap) < window:
            raise ValueError(f"separation.latent_overlap must be in [0, {window}) (codes of past re-fed to each "
                             f"new window of {window} codes), got {overlap}")
        hop = prior.lqvae.hop
        if length % hop:
            raise ValueError(f"separation.length {length} must be a multiple of the LQ-VAE hop {hop}")
        self.prior = prior.eval()
        self.register_buffer("indices", torch.tensor(list(source_indices)))
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32))
        self.likelihood, self.top_k, self.rejection_alpha = likelihood, top_k, rejection_alpha
        self.search, self.beam = search, None if beam is None else int(beam)
        self.target, self.temperature, self.overlap, self.window = target, float(temperature), int(overlap), window
        self.n_steps = length // hop
        self.contrast = None if contrast is None else float(contrast)
        if self.contrast is not None:  # an instance attribute: the loop names its rows from it
            self.extra_choice_names = ("consistent", "class_ratio")
        self.set_sigma(sigma)
        self.nonfinite_steps = 0
        self.score_model = PriorSelection(self)  # after rejection_alpha: its label names it
        self.last_selection, self.last_class_ratio, self.table, self.table_key = None, None, None, None
        self.pair_grid = None  # [K^2, 2] every (i, j), built once on the device (not a buffer: not in state_dict)

    def sum_table(self):
        """The pair table of the current codebook (rebuilt whenever the codebook or alpha changes)."""
        quantizer = self.prior.lqvae.quantizer
        key = (quantizer.codebook.detach().clone(), self.alpha.detach().clone())
        if self.table is None or not all(torch.equal(a, b) for a, b in zip(key, self.table_key)):
            self.table, self.table_key = pair_sum_table(quantizer, self.alpha), key
        return self.table

    def pairs(self, k, device):
        """[K^2, 2] every pair (i, j) of codes, kept: at K = 2048 it is 4M rows, too many to build and copy
        to the device at every step."""
        if self.pair_grid is None or self.pair_grid.shape[0] != k * k or self.pair_grid.device != device:
            codes = torch.arange(k, device=device)
            self.pair_grid = torch.cartesian_prod(codes, codes)
        return self.pair_grid

    def step_scores(self, log_priors, mix_code):
        """Joint scores of the candidate tuples at one step. log_priors [M, N, K] (the separated sources'
        next-code log-probabilities), mix_code [M, D] -> (tuples [M, J, N] of code indices, scores [M, J])."""
        mix_code = mix_code.float()  # distances between nearby codes: float32 even under autocast
        quantizer = self.prior.lqvae.quantizer
        codebook = quantizer.codebook.float()
        n_sources, k = log_priors.shape[1], log_priors.shape[2]
        if n_sources == 2:
            table = self.sum_table().long()  # [K, K]
            if self.target == "latent":
                sum_distance = self.relaxed_pair_distances(mix_code)  # [M, K, K]
            else:
                distance = (mix_code[:, None] - codebook[None]).pow(2).sum(-1)  # [M, K]: ||m_s - e_c||^2
                sum_distance = distance[:, table]  # [M, K, K]
            prior = log_priors[:, 0, :, None] + log_priors[:, 1, None, :]
            tuples = self.pairs(k, mix_code.device).unsqueeze(0).expand(mix_code.shape[0], -1, -1)

            def code_match():
                return (table[None] == quantizer.nearest(mix_code)[:, None, None]).flatten(1)

            return tuples, self.combine(prior.flatten(1), sum_distance.flatten(1), code_match)
        if self.search == "beam":
            return self.beam_scores(log_priors, mix_code, self.beam)
        return self.top_k_scores(log_priors, mix_code, self.top_k)

    def relaxed_pair_distances(self, mix_code):
        """[M, K, K] ||m_s - (alpha_0 e_i + alpha_1 e_j)||^2 for every pair, expanded so that the K^2 sums
        are never formed: |m|^2 + alpha_0^2 |e_i|^2 + alpha_1^2 |e_j|^2 - 2 alpha_0 m.e_i - 2 alpha_1 m.e_j
        + 2 alpha_0 alpha_1 e_i.e_j."""
        codebook = self.prior.lqvae.quantizer.codebook.float()
        a0, a1 = (float(a) for a in self.alpha)
        norms, dots = codebook.pow(2).sum(-1), mix_code @ codebook.T  # [K], [M, K]
        first = a0 * a0 * norms - 2 * a0 * dots
        second = a1 * a1 * norms - 2 * a1 * dots
        cross = 2 * a0 * a1 * (codebook @ codebook.T)
        total = mix_code.pow(2).sum(-1)[:, None, None] + first[:, :, None] + second[:, None, :] + cross
        return total.clamp(min=0)  # rounding can take an exact match a hair below zero

    def top_k_scores(self, log_priors, mix_code, top_k):
        """The top-k approximation for N > 2 sources (module docstring): (tuples [M, top_k^N, N], scores)."""
        n_sources = log_priors.shape[1]
        top = log_priors.topk(top_k, dim=-1)  # values, indices [M, N, k]
        grids = torch.cartesian_prod(*[torch.arange(top_k, device=mix_code.device)] * n_sources)
        grids = grids.view(-1, n_sources)  # [k^N, N]
        source = torch.arange(n_sources, device=mix_code.device)
        tuples = top.indices[:, source, grids]  # [M, k^N, N]
        return tuples, self.relaxed_scores(tuples, top.values[:, source, grids].sum(-1), mix_code)

    def beam_scores(self, log_priors, mix_code, width):
        """The beam for N > 2 sources (latent_beam.py): (tuples [M, min(width, K^N), N], scores)."""
        codebook = self.prior.lqvae.quantizer.codebook
        tuples = beam_search(log_priors, mix_code, codebook, self.alpha, self.sigma, width)
        prior = log_priors.float().gather(2, tuples.transpose(1, 2)).sum(1)  # [M, W]
        return tuples, self.relaxed_scores(tuples, prior, mix_code)

    def relaxed_scores(self, tuples, prior, mix_code):
        """Scores of the tuples [M, J, N] with prior log-probabilities [M, J], the likelihood measured on the
        UNquantised weighted sum of their codes."""
        mix_code = mix_code.float()
        quantizer = self.prior.lqvae.quantizer
        weighted = (self.alpha[None, None, :, None] * quantizer.codebook.float()[tuples]).sum(2)  # [M, J, D]
        sum_distance = (mix_code[:, None] - weighted).pow(2).sum(-1)

        def code_match():  # a K-way search per tuple: only the delta likelihood pays for it
            return quantizer.nearest(weighted) == quantizer.nearest(mix_code)[:, None]

        return self.combine(prior, sum_distance, code_match)

    def mixture_target(self, mix):
        """m_s for every step of mix [B, T]: [B, S, D], quantised or not as ``target`` says."""
        lqvae = self.prior.lqvae
        latent = lqvae.encode(mix.float())
        if self.target == "quantised":
            latent = lqvae.quantizer.quantise(latent)
        return latent.transpose(1, 2)

    def set_sigma(self, sigma):
        if not sigma > 0:
            raise ValueError(f"separation.latent_sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)
        self.trace_sigmas = [self.sigma] * self.n_steps

    def combine(self, prior, sum_distance, code_match):
        """Scores of the tuples; ``code_match()`` -> [M, J] bool is evaluated for the delta likelihood only."""
        gaussian = prior - sum_distance / (2 * self.sigma**2)
        if self.likelihood == "gaussian":
            return gaussian
        code_match = code_match()
        delta = prior.masked_fill(~code_match, -torch.inf)
        return torch.where(code_match.any(dim=1, keepdim=True), delta, gaussian)

    @torch.no_grad()
    def forward(self, mix, n_chains, seeds):
        """mix [B, T] -> (estimates [B, C, N, T], trace {"loglik", "mix_error"} each [B, n_steps])."""
        batch, length = mix.shape
        lqvae, transformer = self.prior.lqvae, self.prior.transformer
        mix_codes = self.mixture_target(mix)
        generators = [torch.Generator(device=mix.device).manual_seed(int(seed)) for seed in seeds]
        n_sources = len(self.indices)
        m = batch * n_chains
        codes = torch.zeros(m, n_sources, self.n_steps, dtype=torch.long, device=mix.device)
        log_prior = torch.zeros(m, n_sources, device=mix.device)
        class_ratio = torch.zeros(m, n_sources, device=mix.device)
        rows = m if self.contrast is None else m * n_sources  # with contrast: every source's past in every prior
        trace_loglik = torch.zeros(batch, self.n_steps, device=mix.device)
        trace_distance = torch.zeros(batch, self.n_steps, device=mix.device)
        for s in range(self.n_steps):
            if self.window_starts(s):
                cache, previous = self.primed_cache(codes, s, rows)
            log_priors, log_pooled = self.source_log_priors(transformer.step(previous, cache).float(), m)
            mix_code = mix_codes[:, s].repeat_interleave(n_chains, dim=0)
            tilted = log_priors if self.contrast is None else log_priors + self.contrast * (log_priors - log_pooled)
            tuples, scores = self.step_scores(tilted, mix_code)
            probs = (scores / self.temperature).softmax(dim=-1).view(batch, n_chains, -1)
            choice = torch.stack([categorical_draw(p, g) for p, g in zip(probs, generators)])
            chosen = tuples[torch.arange(m, device=mix.device), choice.flatten()]  # [M, N]
            codes[:, :, s] = chosen
            step_prior = log_priors.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)  # [M, N]
            log_prior += step_prior
            if log_pooled is not None:
                class_ratio += step_prior - log_pooled.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
            weighted = (self.alpha[None, :, None] * lqvae.quantizer.lookup(chosen)).sum(1)
            trace_loglik[:, s] = step_prior.mean(dim=1).view(batch, n_chains).mean(dim=1)
            trace_distance[:, s] = (mix_code - weighted).pow(2).mean(-1).view(batch, n_chains).mean(dim=1)
            previous = self.as_previous(chosen)
        audio = lqvae.decode_indices(codes.flatten(0, 1)).view(batch, n_chains, n_sources, length)
        self.last_selection = self.rejection_scores(mix, audio, log_prior.view(batch, n_chains, n_sources))
        self.last_class_ratio = class_ratio.sum(1).view(batch, n_chains)
        return audio, {"loglik": trace_loglik, "mix_error": trace_distance}

    def source_log_priors(self, logits, m):
        """The step's logits -> (each separated source's next-code log-probabilities under its own prior
        [M, N, K], the same source's under the pooled prior or None). Without contrast the logits are the
        [M, all priors] of one cache row per chain; with it, [N * M, all priors]: source n's past fed to every
        class prior, whose equal mixture is the pooled prior (paper 003's likelihood ratio)."""
        if self.contrast is None:
            return logits[:, self.indices].log_softmax(dim=-1), None
        n_sources, n_priors = len(self.indices), logits.shape[1]
        every = logits.log_softmax(dim=-1).view(n_sources, m, n_priors, -1)  # [N, M, all priors, K]
        own = every[torch.arange(n_sources, device=logits.device), :, self.indices]  # [N, M, K]
        pooled = every.logsumexp(dim=2) - math.log(n_priors)
        return own.transpose(0, 1), pooled.transpose(0, 1)

    def window_starts(self, s):
        """Whether step s opens a new window: the first at step 0, then every ``window - overlap`` steps once
        the first window is full."""
        if s < self.window:
            return s == 0
        return (s - self.window) % (self.window - self.overlap) == 0

    def primed_cache(self, codes, s, m):
        """(a fresh cache fed the start token and the last ``overlap`` codes drawn before step s, the code to
        feed next: None, the start token, at step 0 or without overlap)."""
        transformer, previous = self.prior.transformer, None
        cache = transformer.new_cache(m)
        for j in range(s - self.overlap, s) if s else ():
            transformer.step(previous, cache)  # the past's own predictions are not needed
            previous = self.as_previous(codes[:, :, j])
        return cache, previous

    def as_previous(self, chosen):
        """[M, N] codes of the separated sources -> the [M, all priors] tokens the Transformer is fed; with
        contrast [N * M, all priors], source n's code to every prior in rows n * M to (n + 1) * M."""
        n_total = self.prior.transformer.n_groups
        if self.contrast is not None:
            return chosen.T.reshape(-1, 1).expand(-1, n_total).contiguous()
        previous = torch.zeros(chosen.shape[0], n_total, dtype=torch.long, device=chosen.device)
        previous[:, self.indices] = chosen
        return previous

    def rejection_scores(self, mix, audio, log_prior):
        """Paper 002 section 4.3, per source so the loop can average them: the priors normalised over each
        mixture's candidates (logits scaled by 1/S), plus alpha_rej times the time-domain log-likelihood
        with sigma_rej from E_b[log p_rej] = -E_b[||m - mix(D(z))||^2] / (2 sigma_rej^2). -> [B*C, N]."""
        normalised = (log_prior / self.n_steps).log_softmax(dim=1)  # [B, C, N]
        if self.rejection_alpha:
            error = (mix[:, None] - (self.alpha[:, None] * audio).sum(2)).pow(2).sum(-1)  # [B, C]
            expected_prior = normalised.sum(2).mean(dim=1, keepdim=True)
            two_sigma2 = -error.mean(dim=1, keepdim=True) / expected_prior.clamp(max=-1e-12)
            # sigma'^2 = alpha sigma_rej^2; split over the N sources, as the loop averages them.
            normalised = normalised - (error / (self.rejection_alpha * two_sigma2)).unsqueeze(2) / normalised.shape[2]
        return normalised.flatten(0, 1)

    def extra_choices(self, mix, estimates):
        """The time-domain consistency choice, the candidate whose decoded sources mix closest to m, and with
        contrast the class-ratio choice."""
        error = (mix[:, None] - (self.alpha[:, None] * estimates).sum(2)).pow(2).mean(-1)  # [B, C]
        choices = {"consistent": error.argmin(dim=1)}
        if self.contrast is not None:  # the candidate whose sources the class priors' ratio assigns best
            choices["class_ratio"] = self.last_class_ratio.argmax(dim=1)
        return choices
