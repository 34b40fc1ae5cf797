"""A coarse-to-fine schedule of the prior's noise level while the variational posterior trains
(``posterior.prior_sigmas``; BASIS' annealing applied to the posterior's fit instead of to a chain).

The training steps are split into ``len(sigmas)`` equal consecutive stages: stage i covers the steps
[round(i * total / L), round((i + 1) * total / L)) and the ELBO uses the prior at ``sigmas[i]``. The stage is
a pure function of the global step, so a resumed run serves the level of the step it resumes at and nothing
about the schedule needs saving. Steps past ``total`` (a run continued with a larger budget than its
schedule) stay on the last, finest level.

A likelihood family (flows, smoothed WaveNet) has one fine-tuned prior per level: they sit in a
``LevelScore`` keyed by the scheduled sigmas (one module may serve two sigmas when levels were matched to
the nearest finished one). A noise-conditional score prior is one network asked for its score at the
stage's sigma. No Lightning here: the posterior module asks ``at(global_step)``.
"""
import bisect
import math

from torch import nn

from lightning_modules.samplers.level_score import LevelScore


def check_sigmas(sigmas, total_steps=None, key="posterior.prior_sigmas"):
    """The schedule's sigmas as floats, or a ValueError saying what is wrong with them (or with a budget of
    ``total_steps`` too short to give each level a step)."""
    try:
        values = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a list of numbers such as [0.3,0.1,0.077], got {sigmas!r}") from None
    if not values:
        raise ValueError(f"{key} needs at least one sigma, e.g. [0.3,0.1,0.077]; got an empty list")
    bad = [s for s in values if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"{key} must all be positive finite sigmas (a noise level, coarse to fine), got {bad} "
                         f"in {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{key} must be strictly descending (coarse to fine, e.g. [0.3,0.1,0.077]), got {values}")
    if total_steps is not None and total_steps < len(values):
        raise ValueError(f"{key} has {len(values)} levels but posterior.max_steps is {total_steps}: each level "
                         f"needs at least one step")
    return values


def stage_starts(total_steps, n_stages):
    """The first step of each stage."""
    return [round(i * total_steps / n_stages) for i in range(n_stages)]


def stage_index(step, total_steps, n_stages):
    """The stage serving ``step``: the last one whose first step is not after it."""
    if n_stages < 1 or total_steps < n_stages:
        raise ValueError(f"a schedule of {n_stages} stages needs at least one step each, got {total_steps} steps")
    return bisect.bisect_right(stage_starts(total_steps, n_stages), step) - 1 if step >= 0 else 0


class PriorSchedule(nn.Module):
    """``sigmas`` (descending) over ``total_steps``; either ``levels``, one frozen prior per sigma (a likelihood
    family), or ``score_prior``, one noise-conditional network. ``at(step)`` -> (prior, score sigma or None),
    the arguments ``elbo_terms`` takes."""

    def __init__(self, sigmas, total_steps, levels=None, score_prior=None):
        super().__init__()
        self.sigmas = check_sigmas(sigmas, total_steps)
        self.total_steps = int(total_steps)
        if (levels is None) == (score_prior is None):
            raise ValueError("a prior schedule takes either one prior per level or one score prior")
        if levels is not None and len(levels) != len(self.sigmas):
            raise ValueError(f"one prior per scheduled sigma is needed: {len(levels)} for {self.sigmas}")
        self.levels = None if levels is None else LevelScore(list(zip(self.sigmas, levels)))
        self.score_prior = score_prior

    def stage(self, step):
        return stage_index(int(step), self.total_steps, len(self.sigmas))

    def sigma(self, step):
        return self.sigmas[self.stage(step)]

    def at(self, step):
        sigma = self.sigma(step)
        if self.score_prior is not None:
            return self.score_prior, sigma
        return self.levels.prior_for(sigma), None

    def priors(self):
        """Each distinct frozen module once (a module serving two sigmas is listed once)."""
        modules = [self.score_prior] if self.score_prior is not None else list(self.levels.priors)
        return list({id(m): m for m in modules}.values())
