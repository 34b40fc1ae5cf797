"""The cross-likelihood experiment: every finished prior family of a run, scored on every source's
test set, as a trainer ``test`` loop (see lightning_modules/cross_likelihood.py).

A noise-conditional family (model.name=score) has no fine-tuned copies: its one noiseless run gives the
model at every sigma_model as log p_sigma (lightning_modules/nn/noise_level_view.py), at 0 and paper 003's
five levels by default, and adds the denoising-loss matrix at DENOISING_SIGMAS (paper 003's levels and
1.0; a fixed list, not a config key)."""
import dataclasses
import logging

import torch

from callbacks.cross_likelihood_callback import CrossLikelihoodReport
from callbacks.denoiser_quality import N_CROPS, write_quality
from datamodules.pooled_sources import POOLED_SOURCE
from datamodules.registry import build_datamodule
from experiments.config import ConfigError, to_dict
from experiments.fitting import family_sources
from experiments.run_layout import (PAPER003_SIGMAS, canonical_sigma, check_compatible, experiment_dir, finished_sigmas,
                                    load_prior, prior_dir)
from experiments.trainer_factory import run_test_loop
from lightning_modules.cross_likelihood import CrossLikelihoodModule
from lightning_modules.metrics.denoiser_quality import denoiser_quality
from lightning_modules.nn.noise_level_view import NoiseLevelView, ode_method
from lightning_modules.prior_registry import is_noise_conditional

log = logging.getLogger(__name__)

# The denoising-loss matrix of a family with denoising_losses (score priors): paper 003's levels and 1.0.
DENOISING_SIGMAS = (*PAPER003_SIGMAS, 1.0)
# How the likelihood families compute log_prob (a family's own ``likelihood_method`` takes precedence).
LIKELIHOOD_METHODS = {"flowavenet": "exact (change of variables)", "wavenet": "exact (autoregressive)"}
# Settings of the likelihood computation only (not of the trained network): the configured ones apply,
# whatever the checkpoint was trained with.
INFERENCE_OPTIONS = ("ode_divergence", "ode_tolerance", "ode_probes")


def resolve_sigmas(config):
    cl = config.cross_likelihood
    available = finished_sigmas(config)
    if 0.0 not in available:
        raise FileNotFoundError(
            f"no finished noiseless prior under {experiment_dir(config)}; run "
            f"make train EXPERIMENT={config.experiment} PRESET={config.preset} first"
        )
    noise_conditional = is_noise_conditional(to_dict(config.model))
    if cl.sigmas_model == "all":
        # A noise-conditional family has every level in its noiseless run.
        sigmas_model = [0.0, *PAPER003_SIGMAS] if noise_conditional else available
    else:
        sigmas_model = sorted({canonical_sigma(float(s)) for s in cl.sigmas_model})
        missing = [] if noise_conditional else [s for s in sigmas_model if s not in available]
        if missing:
            raise FileNotFoundError(
                f"no finished prior for sigma {missing} under {experiment_dir(config)}; "
                f"run make finetune-noise SIGMA=<sigma> first (available: {available})"
            )
    if cl.sigmas_data == "models":
        sigmas_data = sorted(set([0.0] + sigmas_model))
    else:
        sigmas_data = sorted(float(s) for s in cl.sigmas_data)
    return sigmas_model, sigmas_data


def load_noise_conditional(config, pooled=False):
    """The noiseless run's prior, checked against the configured model except for INFERENCE_OPTIONS, which
    are taken from the configuration (e.g. a looser model.ode_tolerance for a quick study)."""
    directory = prior_dir(config, 0.0, pooled=pooled)
    module = load_prior(directory, family_sources(config, pooled))
    model = to_dict(config.model)
    stored = dict(module.hparams["model"])
    stored.update({key: model.get(key) for key in INFERENCE_OPTIONS})
    check_compatible(directory / "last.ckpt", {"model": stored}, expected_model=model)
    prior = module.prior
    configured = {key: model[key] for key in INFERENCE_OPTIONS if model.get(key) is not None}
    if configured:
        prior.cfg = dataclasses.replace(prior.cfg, **configured)
    return prior


def load_pooled(config, sigmas_model):
    """The pooled prior (make train-pooled) at each sigma_model, None where it was not trained."""
    if is_noise_conditional(to_dict(config.model)):
        if 0.0 not in finished_sigmas(config, pooled=True):
            pooled = [None] * len(sigmas_model)
        else:
            prior = load_noise_conditional(config, pooled=True)
            pooled = [NoiseLevelView(prior, s) for s in sigmas_model]
    else:
        available = finished_sigmas(config, pooled=True)
        pooled = [load_prior(prior_dir(config, s, pooled=True), [POOLED_SOURCE], to_dict(config.model)).prior
                  if s in available else None for s in sigmas_model]
    missing = [s for s, p in zip(sigmas_model, pooled) if p is None]
    if missing:
        log.warning("no pooled prior at sigma_model %s: the discrimination report has no likelihood-ratio score "
                    "there (make train-pooled EXPERIMENT=%s PRESET=%s)", missing, config.experiment, config.preset)
    return pooled


def run_cross_likelihood(config):
    cl = config.cross_likelihood
    if cl.latent_only and config.model.name != "flowavenet":
        # Only a flow has a latent term and log-dets to separate; other families have one likelihood.
        raise ConfigError(f"latent_only exists for flow priors (model.name=flowavenet) only; model.name is "
                          f"{config.model.name!r}: drop cross_likelihood.latent_only=true")
    sigmas_model, sigmas_data = resolve_sigmas(config)
    sources, model = list(config.data.sources), to_dict(config.model)
    if is_noise_conditional(model):
        prior = load_noise_conditional(config)
        priors = [NoiseLevelView(prior, s) for s in sigmas_model]
        method = ode_method(prior.cfg, f"max(sigma_model, sigma_min={prior.cfg.sigma_min:g}) of one "
                                       f"noise-conditional network")
    else:
        priors = [load_prior(prior_dir(config, s), sources, model).prior for s in sigmas_model]
        prior = priors[0]
        method = getattr(prior, "likelihood_method", None) or LIKELIHOOD_METHODS.get(model["name"])
        if method and model["name"] == "wavenet":
            method += f", {prior.cfg.likelihood} likelihood"
    denoising_sigmas = list(DENOISING_SIGMAS) if hasattr(prior, "denoising_losses") else None
    out_dir = experiment_dir(config) / "cross_likelihood"
    module = CrossLikelihoodModule(
        priors, sigmas_model, sources, sigmas_data=sigmas_data, inputs=list(cl.inputs),
        n_input_examples=cl.n_input_examples, input_length=config.data.eval_length,
        latent_only=cl.latent_only, noise_seed=cl.noise_seed, table_sigma=PAPER003_SIGMAS[-1],
        likelihood_method=method, denoising_sigmas=denoising_sigmas,
        pooled_priors=load_pooled(config, sigmas_model), sample_rate=config.data.sample_rate,
        coder_bit_depth=cl.coder_bit_depth,
    )
    report = CrossLikelihoodReport(out_dir, to_dict(config))
    datamodule = build_datamodule(config.data, seed=config.seed, n_test=cl.n_test, output_root=config.output_root)
    datamodule.setup("test")  # a bad dataset root stops here, before anything is written
    results = run_test_loop(config, module, datamodule, out_dir, "cross_likelihood", [report])
    if is_noise_conditional(model):
        write_denoiser_quality(config, prior, datamodule, out_dir)
    log.info("cross-likelihood written to %s", out_dir)
    return results, out_dir


def write_denoiser_quality(config, prior, datamodule, out_dir):
    """The denoiser-quality report (as training writes it) on the first validation crops, beside the matrices."""
    datamodule.setup("validate")
    crops = next(iter(datamodule.val_dataloader()))["sources"][:N_CROPS]
    with torch.autocast(crops.device.type, enabled=False):
        report = {"sources": list(config.data.sources), "n_crops": int(crops.shape[0]),
                  **denoiser_quality(prior, crops)}
    write_quality(out_dir, report)
