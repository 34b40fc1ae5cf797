"""Every separation algorithm: what it needs from a run and how it is built from the ``separation`` settings.

A new sampler is one file in this package and one entry in SAMPLERS; ``experiments/separate.py`` resolves what
the entry needs (``needs``) and calls ``build``, and the separation test loop (lightning_modules/separation.py)
reads only the separator's contract: ``forward(mix, n_chains, seeds) -> (samples [B, C, N, T], trace)``, with
optional ``point_estimate_names`` and ``extra_choices``.

needs  "score": the priors' ``score(x, sigma)`` (a noise-conditional family natively, a likelihood family
                through the finished noise levels it was fine-tuned at, looked up in ``grids``, own grid first);
                ``levels(settings)`` gives a Langevin sampler's levels, None takes every finished level;
                build(score_model, alpha, settings, levels)
       "latent": the LQ-VAE family's latent priors; build(latent_prior, alpha, settings, indices, length)
       "posterior": a trained amortised posterior (make train-posterior); build(posterior_module, alpha, settings)
       "data": the run's solo training crops, no trained prior (the control); build(template, alpha, settings)
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from lightning_modules.samplers.langevin import LangevinSeparator, basis_levels, sgld_levels
from lightning_modules.samplers.noise_levels import basis_sigmas, canonical_sigma


@dataclass(frozen=True)
class SamplerEntry:
    needs: str
    build: Callable
    levels: Optional[Callable] = None
    grids: Tuple[str, ...] = ()
    exact_grids: Optional[Tuple[str, ...]] = None  # where a level may come from under prior_levels=exact (None: grids)
    seedable: bool = False  # its chains can start at a trained posterior's sample (separation.init=variational)
    check: Optional[Callable] = None  # settings -> a message when they conflict, else None


def build_langevin(score_model, alpha, settings, levels):
    return LangevinSeparator(score_model, levels, alpha, settings.init_range)


def build_diffusion(score_model, alpha, s, levels=None):
    from lightning_modules.samplers.diffusion import DiffusionSeparator

    return DiffusionSeparator(
        score_model, alpha, sigma_max=s.diffusion_sigma_max, sigma_min=s.diffusion_sigma_min, steps=s.diffusion_steps,
        rho=s.diffusion_rho, solver=s.diffusion_solver, s_churn=s.diffusion_churn, constraint=s.diffusion_constraint,
        gamma_scale=s.diffusion_gamma_scale, corrections=s.diffusion_corrections, init=s.diffusion_init,
        langevin_steps=s.diffusion_langevin_steps, langevin_eta=s.diffusion_langevin_eta,
        dirac_last_sigma=s.diffusion_dirac_last_sigma, relabel_sigmas=s.diffusion_relabel_sigmas,
        pair_sweeps=s.diffusion_pair_sweeps, pair_steps=s.diffusion_pair_steps,
        pair_corrections=s.diffusion_pair_corrections, dirac_derived=s.diffusion_dirac_derived)


def diffusion_conflicts(s):
    if s.init == "variational" and s.diffusion_init == "mixture":
        return "separation.init=variational and diffusion_init=mixture both set the diffusion's start; choose one"
    return None


def build_latent(prior, alpha, s, indices, length):
    from lightning_modules.samplers.latent_posterior import LatentSeparator

    sigma = s.latent_sigma
    if sigma == "auto":
        sigma = 1.0  # a placeholder: experiments/latent_sigma.py sets the calibrated value before separating
    elif isinstance(sigma, str):
        raise ValueError(f"separation.latent_sigma must be a positive number or 'auto', got {sigma!r}")
    return LatentSeparator(prior, indices, alpha, length, sigma, s.latent_likelihood, s.latent_top_k,
                           s.latent_rejection_alpha, s.latent_search, s.latent_beam, s.latent_target,
                           s.latent_temperature, s.latent_overlap, s.latent_window, s.latent_contrast)


def build_variational(module, alpha, s):
    from lightning_modules.samplers.variational import VariationalSeparator

    return VariationalSeparator(module, module.prior)


def build_template(template, alpha, s):
    from lightning_modules.samplers.spectral_template import TemplateSeparator

    return TemplateSeparator(template, alpha)


def basis_schedule(s):
    return basis_levels(basis_sigmas(s.levels, s.sigma_max, s.sigma_min)[::-1], s.delta, s.steps_per_level)


def sgld_schedule(s):
    return sgld_levels(s.sgld_eta, s.sgld_gamma, s.sgld_steps, canonical_sigma(s.sgld_prior_sigma))


# Grids, own first: BASIS anneals over the serial BASIS grid (its levels from there only, under exact); SGLD uses
# one level, which `make finetune-noise SIGMA=...` (the paper003 layout) writes; diffusion takes every level, the
# BASIS grid's where both layouts have one (its levels are fine-tuned along a schedule too).
SAMPLERS = {
    "basis": SamplerEntry("score", build_langevin, basis_schedule, ("basis", "paper003"), ("basis",), seedable=True),
    "sgld": SamplerEntry("score", build_langevin, sgld_schedule, ("paper003", "basis"), seedable=True),
    "diffusion": SamplerEntry("score", build_diffusion, None, ("basis", "paper003"), seedable=True,
                              check=diffusion_conflicts),
    "latent": SamplerEntry("latent", build_latent),
    "variational": SamplerEntry("posterior", build_variational),
    "template": SamplerEntry("data", build_template),
}
