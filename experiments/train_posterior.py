"""Training of the amortised variational posterior (proposal 000; thesis "Modeling the posteriors"):
``make train-posterior EXPERIMENT=toy_flow [SOURCES=sine,square]``.

    {output_root}/{experiment}/{run_name}/posterior/{name}/   last.ckpt (the posterior network only),
        config.yaml, done.json, logs/, posterior_source.json (the frozen prior: directory, sigma, sha256)

The priors are the run's finished ones, frozen: the level fine-tuned at ``posterior.prior_sigma`` (0 = the
noiseless prior), or the nearest finished level with ``posterior.prior_levels=nearest``; a score prior
serves its score at that sigma. The training mixtures come without their sources
(datamodules/mixtures_only.py). Rerunning an interrupted command resumes; a changed prior is refused.
"""
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from callbacks.atomic_checkpoint_io import read_checkpoint
from datamodules.atomic_io import atomic_write_text, file_sha256
from datamodules.mixtures_only import MixtureDataModule
from datamodules.registry import build_datamodule, dataset_mixing
from experiments.config import ConfigError, to_dict
from experiments.fitting import fit
from experiments.run_layout import (canonical_sigma, experiment_dir, finished_priors, is_done, load_prior,
                                   no_prior_error, prior_dir)
from lightning_modules.samplers.mixing import mixing_weights
from lightning_modules.samplers.level_score import log_distance
from lightning_modules.nn.source_subset import SourceSubset
from lightning_modules.posterior_module import PosteriorModule
from lightning_modules.prior_registry import is_noise_conditional

log = logging.getLogger(__name__)
NET_KEYS = ("width", "n_layers", "kernel_size", "distribution", "init_from_average", "init_scale", "min_scale")


def posterior_sources(config):
    sources = list(config.posterior.sources or config.data.sources)
    unknown = [s for s in sources if s not in config.data.sources]
    if unknown or len(set(sources)) != len(sources) or len(sources) < 2:
        raise ConfigError(f"posterior.sources must be at least two distinct sources from the run's priors "
                          f"{list(config.data.sources)}; got {sources}")
    return sources


def posterior_dir(config, sources, name=None):
    return experiment_dir(config) / "posterior" / (name or config.posterior.name or "-".join(sources))


def resolve_prior(config):
    """(prior directory, its sigma, score sigma or None): the frozen prior the ELBO scores samples with."""
    post, family = config.posterior, config.model.name
    if family == "lqvae":
        raise ConfigError("the LQ-VAE family's priors score discrete codes, with no gradient for the posterior's "
                          "samples; separate with separation.algorithm=latent")
    if family == "wavenet" and (config.model.likelihood or "mulaw") == "mulaw":
        raise ConfigError("a mu-law WaveNet scores discrete classes, with no gradient for the posterior's samples; "
                          "train a run with model.likelihood=smoothed")
    sigma = canonical_sigma(post.prior_sigma) if post.prior_sigma > 0 else 0.0
    if post.prior_levels not in ("exact", "nearest"):
        raise ConfigError(f"unknown posterior.prior_levels {post.prior_levels!r}; choose 'exact' or 'nearest'")
    if is_noise_conditional(to_dict(config.model)):
        if sigma <= 0:
            raise ConfigError("a score prior has no score at sigma 0: set posterior.prior_sigma > 0 (e.g. 0.01)")
        directory = prior_dir(config, 0.0)
        if not is_done(directory):
            raise no_prior_error(config)
        return directory, 0.0, sigma
    finished = finished_priors(config, ("paper003", "basis"))
    if not finished:
        raise no_prior_error(config)
    if post.prior_levels == "nearest":
        chosen = min(finished, key=lambda f: log_distance(f["sigma"], sigma))
    else:
        matches = [f for f in finished if f["sigma"] == sigma]
        if not matches:
            args = f"EXPERIMENT={config.experiment} PRESET={config.preset}"
            fix = f"make finetune-noise SIGMA={sigma:g} {args}" if sigma else f"make train {args}"
            raise FileNotFoundError(f"no finished prior at sigma {sigma:g} under {experiment_dir(config)} (finished: "
                                    f"{[f['sigma'] for f in finished]}); run {fix}, or pass posterior.prior_sigma="
                                    f"<one of those> or posterior.prior_levels=nearest")
        chosen = matches[0]
    return Path(chosen["dir"]), chosen["sigma"], None


def source_record(config, sources):
    directory, sigma, score_sigma = resolve_prior(config)
    return {"prior_dir": str(directory), "prior_sigma": sigma, "score_sigma": score_sigma,
            "sha256": file_sha256(directory / "last.ckpt"), "sources": sources}


def build_module(config, sources, record):
    prior = load_prior(record["prior_dir"], list(config.data.sources), to_dict(config.model)).prior
    prior = SourceSubset(prior, list(config.data.sources), sources)
    post = config.posterior
    alpha = mixing_weights(dataset_mixing(config.data.name), len(sources))
    return PosteriorModule(net={key: post[key] for key in NET_KEYS}, sources=sources, alpha=alpha.tolist(),
                           gamma=post.gamma, warmup_steps=post.warmup_steps, lr=post.lr,
                           lr_decay_times=post.lr_decay_times, schedule_steps=post.max_steps,
                           score_sigma=record["score_sigma"], seed=config.seed, prior=prior)


def check_source(run_dir, record):
    """Refuse to continue (or use) a posterior whose frozen prior changed since it was trained."""
    recorded = json.loads((Path(run_dir) / "posterior_source.json").read_text())
    if recorded["sha256"] != record["sha256"] or recorded["prior_dir"] != record["prior_dir"]:
        raise ValueError(f"the prior of the posterior in {run_dir} changed since it was trained "
                         f"({recorded['prior_dir']} -> {record['prior_dir']}, or new weights); delete {run_dir} "
                         f"or pass another posterior.name to train one for the new prior")
    if recorded["sources"] != record["sources"]:
        raise ValueError(f"the posterior in {run_dir} separates {recorded['sources']}, not {record['sources']}")


def check_resume(config, sources):
    expected = {key: config.posterior[key] for key in NET_KEYS}

    def check(path, hparams):
        if hparams.get("sources") != sources or hparams.get("net") != expected:
            raise ValueError(f"checkpoint {path} is a posterior for {hparams.get('sources')} with "
                             f"{hparams.get('net')}, not this configuration ({sources}, {expected}); use its "
                             f"settings or another posterior.name")
    return check


def train_posterior(config):

    sources = posterior_sources(config)
    run_dir = posterior_dir(config, sources)
    record = source_record(config, sources)
    if (run_dir / "posterior_source.json").is_file():
        check_source(run_dir, record)
    post = config.posterior
    data = OmegaConf.merge(config.data, {"sources": sources, "n_val": post.n_val,
                                         "crop_length": post.crop_length or config.data.crop_length})
    base = build_datamodule(data, seed=config.seed, output_root=config.output_root)
    torch.manual_seed(config.seed)  # the initial weights depend on the seed only
    module = build_module(config, sources, record)
    datamodule = MixtureDataModule(base, module.alpha.tolist(), independent=config.data.name != "toy",
                                   batch_size=post.batch_size)
    if not is_done(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "posterior_source.json", json.dumps(record, indent=2))
    log.info("posterior for %s against the prior %s (sigma %g) into %s", sources, record["prior_dir"],
             record["prior_sigma"], run_dir)
    return fit(config, run_dir, module, post.max_steps, post.val_check_interval, job_type="posterior",
               early_stopping=False, extra={"prior": record}, datamodule=datamodule,
               check_resume=check_resume(config, sources))


def load_posterior(config, sources, name=None):
    """(finished PosteriorModule with its frozen prior, record) for ``sources``."""
    run_dir = posterior_dir(config, sources, name)
    if not is_done(run_dir):
        subset = f" SOURCES={','.join(sources)}" if list(sources) != list(config.data.sources) else ""
        raise FileNotFoundError(f"no finished posterior at {run_dir}; train it first: make train-posterior "
                                f"EXPERIMENT={config.experiment} PRESET={config.preset}{subset}")
    trained = OmegaConf.load(run_dir / "config.yaml")
    config = OmegaConf.merge(config, {"posterior": trained.posterior})
    record = source_record(config, list(sources))
    check_source(run_dir, record)
    module = build_module(config, list(sources), record)
    state = read_checkpoint(run_dir / "last.ckpt")["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("prior.")]
    if missing or unexpected:
        raise ValueError(f"{run_dir / 'last.ckpt'} does not match the posterior network: missing {missing}, "
                         f"unexpected {unexpected}")
    return module.eval(), {**record, "posterior_dir": str(run_dir)}
