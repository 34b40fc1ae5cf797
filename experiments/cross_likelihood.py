"""The cross-likelihood experiment: every finished prior family of a run, scored on every source's
test set, as a trainer ``test`` loop (see lightning_modules/cross_likelihood.py)."""
import logging

from callbacks.cross_likelihood_callback import CrossLikelihoodReport
from datamodules.registry import build_datamodule
from experiments.config import ConfigError, to_dict
from experiments.run_layout import (PAPER003_SIGMAS, canonical_sigma, experiment_dir, finished_sigmas, load_prior,
                                    prior_dir)
from experiments.trainer_factory import run_test_loop
from lightning_modules.cross_likelihood import CrossLikelihoodModule

log = logging.getLogger(__name__)


def resolve_sigmas(config):
    cl = config.cross_likelihood
    available = finished_sigmas(config)
    if 0.0 not in available:
        raise FileNotFoundError(
            f"no finished noiseless prior under {experiment_dir(config)}; run "
            f"make train EXPERIMENT={config.experiment} PRESET={config.preset} first"
        )
    if cl.sigmas_model == "all":
        sigmas_model = available
    else:
        sigmas_model = sorted({canonical_sigma(float(s)) for s in cl.sigmas_model})
        missing = [s for s in sigmas_model if s not in available]
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


def run_cross_likelihood(config):
    cl = config.cross_likelihood
    if cl.latent_only and config.model.name != "flowavenet":
        # Only a flow has a latent term and log-dets to separate; other families have one likelihood.
        raise ConfigError(f"latent_only exists for flow priors (model.name=flowavenet) only; model.name is "
                          f"{config.model.name!r}: drop cross_likelihood.latent_only=true")
    sigmas_model, sigmas_data = resolve_sigmas(config)
    sources, model = list(config.data.sources), to_dict(config.model)
    priors = [load_prior(prior_dir(config, s), sources, model).prior for s in sigmas_model]
    out_dir = experiment_dir(config) / "cross_likelihood"
    module = CrossLikelihoodModule(
        priors, sigmas_model, sources, sigmas_data=sigmas_data, inputs=list(cl.inputs),
        n_input_examples=cl.n_input_examples, input_length=config.data.eval_length,
        latent_only=cl.latent_only, noise_seed=cl.noise_seed, table_sigma=PAPER003_SIGMAS[-1],
    )
    report = CrossLikelihoodReport(out_dir, to_dict(config))
    datamodule = build_datamodule(config.data, seed=config.seed, n_test=cl.n_test, output_root=config.output_root)
    datamodule.setup("test")  # a bad dataset root stops here, before anything is written
    results = run_test_loop(config, module, datamodule, out_dir, "cross_likelihood", [report])
    log.info("cross-likelihood written to %s", out_dir)
    return results, out_dir
