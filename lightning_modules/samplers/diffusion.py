"""Separation by diffusion posterior sampling: ISDM (Mariani et al., ICLR 2024) with the EDM sampler
(Karras et al. 2022, Alg. 2).

The model: ``m = g(x) = sum_k alpha_k x_k`` with independent source priors. Each prior is known only
through its noisy score ``s_k(x_k, sigma) = grad log p_sigma(x_k)``, p_sigma = p_k * N(0, sigma^2).
The sampler integrates the probability-flow ODE ``dx/dsigma = -sigma * grad_x log p_sigma(x | m)``
from sigma_max down to 0, on the Karras schedule

    sigma_i = (sigma_max^(1/rho) + i/(steps-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < steps,
    sigma_steps = 0,

with an Euler step, a Heun correction while sigma_{i+1} > 0, and the last step sigma_min -> 0 done
with Euler as in EDM Alg. 2 (it is Tweedie's denoiser of the posterior score, so no separate
denoise call is needed). The posterior score is approximated in one of two ways:

* ``dirac`` (ISDM / MSDM): m = g(x) exactly. The free variables are x_0..x_{N-2} and the last source
  is ``x_{N-1} = (m - sum_{k<N-1} alpha_k x_k) / alpha_{N-1}``; by the chain rule

      grad_{x_k} [log p(x_k) + log p(x_{N-1}(x))] = s_k(x_k) - (alpha_k / alpha_{N-1}) s_{N-1}(x_{N-1}).

  Only the free sources move (noise included), the last one is recomputed after every update, so
  g(x) = m up to float rounding at every step. Which source is derived is a choice (``dirac_derived``: the
  last, any index, or one per chain), and it decides what the chains find.
* ``projected``: the same constraint m = g(x), treated symmetrically. All sources are free; every
  update (noise included) is projected orthogonally onto the plane g(x) = m,

      x <- x + alpha (m - g(x)) / |alpha|^2,

  which leaves the prior scores' component inside the plane: the Dirac posterior's density in orthogonal
  coordinates. No source is derived, so none carries the others' errors (Dirac's last source has noise
  sqrt(N - 1) sigma for equal weights). Projection shrinks the noise to (N - 1) / N of sigma^2 per source on
  average, so noise draws are scaled by sqrt(N / (N - 1)) and score steps by N / (N - 1); for two equal
  weights the sampler is then exactly the Dirac one.
* ``gaussian``: m = g(x) + N(0, gamma^2), gamma = gamma_scale * sigma; all sources are free and

      grad_{x_k} log p(x | m) = s_k(x_k) + alpha_k (m - g(x)) / gamma^2.

Neither is the exact score of the noise-convolved posterior, so the deterministic ODE does not land
exactly on p(x | m) even with perfect priors (with Gaussian priors and the Dirac constraint the last
source's variance comes out far too small). Stochastic additions help: EDM's churn (before every step,
correction redos included, raise sigma to sigma_hat = sigma (1 + gamma_i), gamma_i = min(s_churn /
steps, sqrt(2) - 1) inside [s_tmin, s_tmax], with noise of variance s_noise^2 (sigma_hat^2 - sigma^2)),
ISDM's correction steps (re-noise from sigma_{i+1} back to sigma_i and redo the step) and
``langevin_steps`` Langevin steps ``x <- x + eta * score + sqrt(2 eta) eps`` at sigma_min, eta =
langevin_eta * sigma_min^2, just before the last step to 0: these sample the approximate posterior at
sigma_min up to the O(eta) bias of the discretisation.

Step sizes. A prior's score has curvature at most 1 / sigma^2; the Dirac posterior score's is up to
c / sigma^2 with c = 1 + sum_{k<N-1} (alpha_k / alpha_{N-1})^2 (N for equal weights); the gaussian one
has c = 1 + |alpha|^2 / gamma_scale^2; the projected one c = N / (N - 1). An Euler or Heun step multiplies
that direction by about 1 - c (1 - sigma_{i+1} / sigma_hat), so it is stable only if
sigma_{i+1} / sigma_hat > 1 - 2 / c (> 1/2 for four equal weights): use enough steps, more with churn.

Pair refinement (``pair_sweeps``, ``pair_refinement.py``): after the N-source run, every pair of sources is
re-separated by two-source runs of this sampler with the pair's sum held fixed, a move that can exchange whole
components between slots, which no step above can.

Trained range. No sigma asked of the score model exceeds the largest it was trained at
(``largest_trained_sigma``): sigma_max is capped there, with a warning, and churn never raises sigma_hat
above it.
"""
import logging
import math

import torch
from torch import nn

from lightning_modules.samplers.draws import per_mixture_draws
from lightning_modules.samplers.level_score import LevelScore
from lightning_modules.samplers.mixture_projection import project_to_mixture
from lightning_modules.samplers.pair_refinement import PairView, check_pairs, refine_pairs
from lightning_modules.samplers.relabel import MAX_SOURCES, relabel

log = logging.getLogger(__name__)

SOLVERS = ("euler", "heun")
CONSTRAINTS = ("dirac", "projected", "gaussian")
LAST_SIGMAS = ("same", "scaled")
INITS = ("noise", "mixture")


def karras_sigmas(sigma_max, sigma_min, steps, rho=7.0):
    """The ``steps`` positive noise levels of EDM eq. 5, from sigma_max down to sigma_min (no final 0)."""
    if not sigma_max > sigma_min > 0 or steps < 2:
        raise ValueError(f"need sigma_max > sigma_min > 0 and steps >= 2, got {sigma_max}, {sigma_min}, {steps}")
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = [(top + i / (steps - 1) * (bottom - top)) ** rho for i in range(steps)]
    sigmas[0], sigmas[-1] = float(sigma_max), float(sigma_min)  # exact ends despite the rounding
    return sigmas


def largest_trained_sigma(score_model):
    """(sigma, what it is) for the largest sigma ``score_model`` knows, or (None, None) when it has no limit
    (an analytic prior): a LevelScore's top fine-tuned level, or a noise-conditional score prior's trained
    sigma_max, also through wrappers that keep the prior as ``.prior`` (SourceSubset)."""
    if isinstance(score_model, LevelScore):
        return max(score_model.sigmas), "the top fine-tuned level"
    while score_model is not None:
        if getattr(score_model, "noise_conditional", False) and hasattr(score_model, "cfg"):
            return float(score_model.cfg.sigma_max), "the score prior's trained sigma_max"
        score_model = getattr(score_model, "prior", None)
    return None, None


class DiffusionSeparator(nn.Module):
    """Same interface as ``LangevinSeparator``: ``forward(mix, n_chains, seeds)``, ``alpha``, ``n_steps``.

    All mixtures and chains move as one batch [B * C, N, T] through ``score_model.score``; every noise
    draw is made per mixture from its own generator, so a result does not depend on the batch it is in.
    """

    def __init__(self, score_model, alpha, sigma_max=1.0, sigma_min=1e-4, steps=150, rho=7.0,
                 solver="heun", s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
                 constraint="dirac", gamma_scale=1.0, corrections=0, init="noise",
                 langevin_steps=0, langevin_eta=0.1, dirac_last_sigma="same", relabel_sigmas=(), pair_sweeps=0,
                 pair_steps=None, pair_corrections=None, dirac_derived="last"):
        super().__init__()
        if dirac_last_sigma not in LAST_SIGMAS:
            raise ValueError(f"unknown dirac_last_sigma {dirac_last_sigma!r}; choose from {list(LAST_SIGMAS)}")
        if dirac_last_sigma == "scaled" and not getattr(score_model, "noise_conditional", False):
            raise ValueError("diffusion_dirac_last_sigma=scaled needs a noise-conditional score prior (one score per "
                             "source at its own sigma)")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose from {list(SOLVERS)}")
        if constraint not in CONSTRAINTS:
            raise ValueError(f"unknown constraint {constraint!r}; choose from {list(CONSTRAINTS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose from {list(INITS)}")
        if s_churn < 0 or corrections < 0 or langevin_steps < 0:
            raise ValueError(f"s_churn, corrections and langevin_steps must be >= 0, got "
                             f"{s_churn}, {corrections}, {langevin_steps}")
        if gamma_scale <= 0 or langevin_eta <= 0 or s_noise < 0:
            raise ValueError(f"need gamma_scale > 0, langevin_eta > 0, s_noise >= 0, got "
                             f"{gamma_scale}, {langevin_eta}, {s_noise}")
        self.relabel_sigmas = sorted((float(s) for s in relabel_sigmas), reverse=True)
        if self.relabel_sigmas and getattr(score_model, "selection_score", None) is None:
            raise ValueError("diffusion_relabel_sigmas needs priors with a selection_score (the score family)")
        if self.relabel_sigmas and (min(self.relabel_sigmas) <= 0 or len(alpha) > MAX_SOURCES):
            raise ValueError(f"diffusion_relabel_sigmas must be positive and the sources at most {MAX_SOURCES}, "
                             f"got {self.relabel_sigmas} for {len(alpha)} sources")
        self.score_model = score_model
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32))
        if len(self.alpha) < 2 or not (self.alpha != 0).all():
            raise ValueError(f"need at least two non-zero mixing weights, got {self.alpha.tolist()}")
        self.sigma_cap, sigma_max = self._cap(score_model, sigma_max, sigma_min)
        self.sigmas = karras_sigmas(sigma_max, sigma_min, steps, rho) + [0.0]
        self.solver, self.constraint, self.init = solver, constraint, init
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise
        self.gamma_scale, self.corrections = gamma_scale, int(corrections)
        self.langevin_steps, self.langevin_eta = int(langevin_steps), langevin_eta
        # Under the Dirac constraint the derived source d is (m - sum_{k != d} alpha_k x_k) / alpha_d: its noise has
        # std sigma * sqrt(sum_{k != d} (alpha_k / alpha_d)^2) (sqrt(N - 1) for equal weights), not sigma. "scaled"
        # asks its score at that level; "same" (ISDM) at sigma. For two equal weights the two agree.
        # Which source the Dirac constraint derives: "last", a source index, or "rotate" (chain c of a mixture
        # derives source N - 1 - c mod N, so chain 0 is "last"). It decides what the chains find: validation
        # sine + triangle, one chain, -19.6 dB SI-SDRi with the triangle derived, +15.1 with the sine.
        if not (dirac_derived in ("last", "rotate") or (isinstance(dirac_derived, int)
                                                         and 0 <= dirac_derived < len(self.alpha))):
            raise ValueError(f"dirac_derived must be 'last', 'rotate' or a source index below {len(self.alpha)}, "
                             f"got {dirac_derived!r}")
        self.dirac_derived = dirac_derived
        ratios = self.alpha.view(1, -1) / self.alpha.view(-1, 1)  # [derived d, k]: alpha_k / alpha_d
        scales = (ratios.pow(2).sum(dim=1) - 1).sqrt()  # sqrt(sum_{k != d} (alpha_k / alpha_d)^2)
        self.register_buffer("last_sigma_scales", scales if dirac_last_sigma == "scaled" else torch.ones_like(scales))
        self.per_source_levels = bool((self.last_sigma_scales != 1).any())  # decided once, not at every score call
        self.initializer = None  # (mix, n_chains, seeds) -> [B * C, N, T] added to the first noise (separation.init)
        self.nonfinite_steps = 0
        self.relabelled_chains = 0  # chains relabelled at least once in the last forward
        self.pair_sweeps, self.pair_moves = int(pair_sweeps), 0
        check_pairs(score_model, self.alpha, self.pair_sweeps)
        self._pairs = None  # (PairView, two-source sampler): a tuple, so the priors are not registered twice
        if self.pair_sweeps and len(self.alpha) > 2:
            view = PairView(score_model)
            self._pairs = (view, DiffusionSeparator(
                view, [float(self.alpha[0])] * 2, sigma_max, sigma_min, steps=pair_steps or steps, rho=rho,
                solver=solver, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, constraint=constraint,
                gamma_scale=gamma_scale, corrections=corrections if pair_corrections is None else pair_corrections,
                init=init, langevin_steps=langevin_steps, langevin_eta=langevin_eta, dirac_derived="rotate"))
        cap = math.inf if self.sigma_cap is None else self.sigma_cap
        self.churn_capped_levels = sum(s * (1 + self._churn(s)) > cap for s in self.sigmas[:-1])
        if self.churn_capped_levels:
            log.info("EDM churn capped at sigma %g on %d of %d levels", cap, self.churn_capped_levels,
                     len(self.sigmas) - 1)

    @staticmethod
    def _cap(score_model, sigma_max, sigma_min):
        """(the cap on every sigma asked of the score model or None, the schedule's sigma_max).

        Capped, not just warned: above its top level a LevelScore serves every sigma with that level's
        prior (default sigma_max 5 against a top level of 1), whose score is far too steep for the chains
        there, and a score network was never trained above its sigma_max. The capped schedule is what the
        summary's step_sigmas record."""
        cap, what = largest_trained_sigma(score_model)
        if cap is None or sigma_max <= cap:
            return cap, sigma_max
        if cap <= sigma_min:  # no schedule fits (e.g. only the noiseless level): run it as asked, but say so
            log.warning("diffusion sigma_max=%g and sigma_min=%g are both above %s (%g): the whole schedule is "
                        "served from outside the trained range", sigma_max, sigma_min, what, cap)
            return None, sigma_max
        log.warning("diffusion sigma_max=%g is above %s (%g): the schedule starts at %g instead",
                    sigma_max, what, cap, cap)
        return cap, cap

    @property
    def trace_sigmas(self):
        """The sigma each trace entry starts from: per level its step and corrections; Langevin at sigma_min."""
        out = []
        for sigma, sigma_next in zip(self.sigmas[:-1], self.sigmas[1:]):
            if sigma_next == 0:
                out += [sigma] * self.langevin_steps
            out += [sigma] * (1 + (self.corrections if sigma_next > 0 else 0))
        return out

    @property
    def n_steps(self):
        return len(self.trace_sigmas)

    @property
    def score_evaluations(self):
        """Calls to ``score`` per forward (each on the whole [B * C, N, T] batch)."""
        moves = len(self.sigmas) - 2  # steps between positive levels, each with its corrections
        per_move = 2 if self.solver == "heun" else 1
        return moves * (1 + self.corrections) * per_move + self.langevin_steps + 1

    def _churn(self, sigma):
        if self.s_tmin <= sigma <= self.s_tmax:
            return min(self.s_churn / (len(self.sigmas) - 1), math.sqrt(2) - 1)
        return 0.0

    def derived_sources(self, batch, n_chains, device):
        """[B * C] long: the source each chain's Dirac constraint derives (read by the projected start too)."""
        n_sources = len(self.alpha)
        if self.dirac_derived == "rotate":
            per_chain = (n_sources - 1 - torch.arange(n_chains, device=device)) % n_sources
            return per_chain.repeat(batch)
        index = n_sources - 1 if self.dirac_derived == "last" else self.dirac_derived
        return torch.full((batch * n_chains,), index, dtype=torch.long, device=device)

    def forward(self, mix, n_chains, seeds):
        """mix [B, T] -> estimates [B, C, N, T], trace {"mix_error", "loglik"} each [B, n_steps].

        ``mix_error``: mean over chains of ||m - g(x)||^2 / T before each step (~0 for dirac);
        ``loglik``: NaN (no cheap likelihood here), kept for the separation loop's trace.
        """
        batch, length = mix.shape
        n_sources = len(self.alpha)
        if len(seeds) != batch:
            raise ValueError("one seed per mixture is needed")
        draw = per_mixture_draws(seeds, (n_chains, n_sources, length), mix.device)

        def noise():
            return draw(torch.randn)

        def fresh():  # noise for the free sources, scaled so that each has (on average) variance sigma^2
            return noise() * free * spread

        alpha = self.alpha.view(1, -1, 1)
        target = mix.float().repeat_interleave(n_chains, dim=0).unsqueeze(1)  # [B * C, 1, T]
        dirac = self.constraint == "dirac"
        projected = self.constraint == "projected"
        # Projected noise has per-source variance sigma^2 (1 - alpha_k^2 / |alpha|^2), (N - 1) / N of sigma^2 on
        # average: every noise draw is scaled up by spread and every score step by spread^2 (a scalar
        # preconditioner, the same posterior), so the denoisers see the noise level they are asked at. For two
        # equal weights this is exactly the Dirac sampler.
        spread = math.sqrt(n_sources / (n_sources - 1)) if projected else 1.0
        # Which sources are free: noise and updates touch only those (dirac: all but the derived one, per chain).
        derived = self.derived_sources(batch, n_chains, mix.device)  # [B * C]
        anchor = nn.functional.one_hot(derived, n_sources).float().unsqueeze(-1)  # [B * C, N, 1]
        free = 1 - anchor if dirac else torch.ones_like(anchor)
        alpha_derived = (alpha * anchor).sum(dim=1, keepdim=True)  # [B * C, 1, 1]
        ratio = alpha / alpha_derived
        level_scale = 1 + anchor[..., 0] * (self.last_sigma_scales[derived].view(-1, 1) - 1)  # [B * C, N]
        nonfinite = torch.zeros((), dtype=torch.long, device=mix.device)

        def project(x):
            if projected:
                return project_to_mixture(target[:, 0], x, self.alpha)
            if not dirac:
                return x
            rest = (alpha * x * free).sum(dim=1, keepdim=True)
            return x * free + anchor * (target - rest) / alpha_derived

        def posterior_score(x, sigma):
            nonlocal nonfinite
            level = float(sigma)
            if dirac and self.per_source_levels:  # each source at its own noise level: [B * C, N]
                level = float(sigma) * level_scale
            score = self.score_model.score(x, level).float()
            # A non-finite prior score would poison the chain for good: that chain skips this move
            # (counted per chain and score call).
            finite = torch.isfinite(score).flatten(1).all(dim=1).view(-1, 1, 1)
            nonfinite = nonfinite + (~finite).sum()
            if dirac:  # chain rule through the derived x_d(x); the derived source itself does not move
                post = (score - ratio * (score * anchor).sum(dim=1, keepdim=True)) * free
            elif projected:  # the projection after every update removes the part normal to the plane
                post = spread**2 * score
            else:
                gamma = self.gamma_scale * sigma
                post = score + alpha * (target - (alpha * x).sum(dim=1, keepdim=True)) / gamma**2
            return torch.where(finite, post, torch.zeros_like(post)), finite

        def ode_step(x, sigma, sigma_next):
            churn = self._churn(sigma)
            sigma_hat = sigma * (1 + churn)
            if self.sigma_cap is not None:  # churn must not leave the trained range (EDM's churn ignores it)
                sigma_hat = min(sigma_hat, max(sigma, self.sigma_cap))
            if sigma_hat > sigma:
                x = project(x + math.sqrt(sigma_hat**2 - sigma**2) * self.s_noise * fresh())
            score, _ = posterior_score(x, sigma_hat)
            slope = -sigma_hat * score  # dx/dsigma = -sigma * score
            x_next = project(x + (sigma_next - sigma_hat) * slope)
            if self.solver == "heun" and sigma_next > 0:
                score_next, finite = posterior_score(x_next, sigma_next)
                # A non-finite second evaluation falls back to the Euler step.
                slope_next = torch.where(finite, -sigma_next * score_next, slope)
                x_next = project(x + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next))
            return x_next

        x = fresh() * self.sigmas[0]
        if projected and self.init == "noise" and self.initializer is None:
            # As under Dirac, the derived source starts with the mixture and the others at noise around 0. The
            # projection of pure noise would start every source at the mixture, symmetric between the sources,
            # and the chains separate far worse from there (validation sine + square: +14 dB against +43).
            x = x + anchor * target / alpha_derived
        if self.init == "mixture":  # the Average baseline: every source gets m / (N alpha_k)
            x = x + target / (n_sources * alpha)
        if self.initializer is not None:  # e.g. a sample of the variational posterior
            x = x + self.initializer(mix, n_chains, seeds).float() * free
        x = project(x)
        errors = []

        def record(x):
            errors.append((target - (alpha * x).sum(dim=1, keepdim=True)).pow(2).mean(dim=(1, 2)))

        pending = list(self.relabel_sigmas)
        relabelled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for sigma, sigma_next in zip(self.sigmas[:-1], self.sigmas[1:]):
            if pending and sigma <= pending[0] and sigma_next > 0:  # once per listed sigma, at the first level below it
                pending = [s for s in pending if s < sigma]
                x, moved = relabel(self.score_model, x, sigma, self.alpha)
                x, relabelled = project(x), relabelled | moved
            if sigma_next == 0:  # Langevin at sigma_min before the last step to 0
                eta = self.langevin_eta * sigma**2
                for _ in range(self.langevin_steps):
                    record(x)
                    score, _ = posterior_score(x, sigma)
                    x = project(x + eta * score + math.sqrt(2 * eta) * fresh())
            for repeat in range(1 + (self.corrections if sigma_next > 0 else 0)):
                if repeat:  # ISDM correction: back from sigma_next to sigma with fresh noise, redo
                    x = project(x + math.sqrt(sigma**2 - sigma_next**2) * fresh())
                record(x)
                x = ode_step(x, sigma, sigma_next)
        self.nonfinite_steps = int(nonfinite)
        self.relabelled_chains = int(relabelled.sum())
        if self._pairs is not None:  # block moves between pairs of sources (pair_refinement.py); not traced
            row_seeds = [int(s) * 1009 + c for s in seeds for c in range(n_chains)]
            x, self.pair_moves = refine_pairs(self._pairs[1], self._pairs[0], x, self.alpha, row_seeds,
                                              self.pair_sweeps)
        mix_error = torch.stack(errors, dim=1).view(batch, n_chains, -1).mean(dim=1)
        trace = {"mix_error": mix_error, "loglik": torch.full_like(mix_error, math.nan)}
        return x.view(batch, n_chains, n_sources, length), trace
