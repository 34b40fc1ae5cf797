"""Training of the amortised variational posterior (proposal 000; thesis "Modeling the posteriors"):
``make train-posterior EXPERIMENT=toy_flow [SOURCES=sine,square]``.

    {output_root}/{experiment}/{run_name}/posterior/{name}/   last.ckpt (the posterior network only),
        config.yaml, done.json, logs/, posterior_source.json (the frozen prior: directory, sigma, sha256)

The priors are the run's finished ones, frozen: the level fine-tuned at ``posterior.prior_sigma`` (0 = the
noiseless prior), or the nearest finished level with ``posterior.prior_levels=nearest``; a score prior
serves its score at that sigma. ``posterior.prior_sigmas`` (a descending list) replaces that one level by a
coarse-to-fine schedule during training (lightning_modules/nn/prior_schedule.py); the finished posterior
belongs to its last level, which validation and separation use. The training mixtures come without their
sources (datamodules/mixtures_only.py). Rerunning an interrupted command resumes; a changed prior (at any
level) is refused.
"""
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from callbacks.atomic_checkpoint_io import read_checkpoint
from datamodules.atomic_io import atomic_write, atomic_write_text, file_sha256
from datamodules.mixtures_only import MixtureDataModule
from datamodules.registry import build_datamodule, dataset_mixing
from experiments.config import ConfigError, to_dict
from experiments.fitting import fit
from experiments.run_layout import (canonical_sigma, experiment_dir, finished_priors, is_done, load_prior,
                                   no_prior_error, prior_dir)
from lightning_modules.samplers.mixing import mixing_weights
from lightning_modules.samplers.prior_sampling import sample_flow_prior, sample_score_prior
from lightning_modules.samplers.level_score import log_distance
from lightning_modules.nn.source_subset import SourceSubset
from lightning_modules.nn.prior_schedule import PriorSchedule
from lightning_modules.posterior_module import FROZEN_PREFIXES, PosteriorModule
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


def posterior_name(config, sources, name=None):
    """The posterior's folder name: ``name`` (separation.posterior), else posterior.name, else the sources."""
    return name or config.posterior.name or "-".join(sources)


def posterior_dir(config, sources, name=None):
    return experiment_dir(config) / "posterior" / posterior_name(config, sources, name)


def check_family(config):
    post, family = config.posterior, config.model.name
    if family == "lqvae":
        raise ConfigError("the LQ-VAE family's priors score discrete codes, with no gradient for the posterior's "
                          "samples; separate with separation.algorithm=latent")
    if family == "wavenet" and (config.model.likelihood or "mulaw") == "mulaw":
        raise ConfigError("a mu-law WaveNet scores discrete classes, with no gradient for the posterior's samples; "
                          "train a run with model.likelihood=smoothed")
    if post.prior_levels not in ("exact", "nearest"):
        raise ConfigError(f"unknown posterior.prior_levels {post.prior_levels!r}; choose 'exact' or 'nearest'")


def resolve_prior(config):
    """(prior directory, its sigma, score sigma or None): the frozen prior the ELBO scores samples with."""
    check_family(config)
    return resolve_level(config, config.posterior.prior_sigma)


def resolve_level(config, sigma, scheduled=False):
    """(prior directory, its sigma, score sigma or None) of the finished prior serving ``sigma``;
    ``scheduled``: one level of posterior.prior_sigmas (the error names that key)."""
    post = config.posterior
    sigma = canonical_sigma(sigma) if sigma > 0 else 0.0
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
            other = ("posterior.prior_sigmas=[<some of those, descending>]" if scheduled
                     else "posterior.prior_sigma=<one of those>")
            level = f" (a level of posterior.prior_sigmas={list(post.prior_sigmas)})" if scheduled else ""
            raise FileNotFoundError(f"no finished prior at sigma {sigma:g}{level} under {experiment_dir(config)} "
                                    f"(finished: {[f['sigma'] for f in finished]}); run {fix}, or pass {other} "
                                    f"or posterior.prior_levels=nearest")
        chosen = matches[0]
    return Path(chosen["dir"]), chosen["sigma"], None


def source_record(config, sources):
    """posterior_source.json: the frozen prior (directory, sigma, sha256). With posterior.prior_sigmas, also
    ``prior_sigmas`` and ``levels`` (one such record per scheduled sigma); the top-level fields are then the
    last, finest level, the one the finished posterior is used with."""
    if config.posterior.prior_sigmas is None:  # the single-level record, as before schedules existed
        directory, sigma, score_sigma = resolve_prior(config)
        return {"prior_dir": str(directory), "prior_sigma": sigma, "score_sigma": score_sigma,
                "sha256": file_sha256(directory / "last.ckpt"), "sources": sources}
    check_family(config)
    levels, digests = [], {}
    for wanted in config.posterior.prior_sigmas:
        directory, sigma, score_sigma = resolve_level(config, wanted, scheduled=True)
        if directory not in digests:  # a score prior serves every level from one checkpoint
            digests[directory] = file_sha256(directory / "last.ckpt")
        levels.append({"sigma": canonical_sigma(wanted), "prior_dir": str(directory), "prior_sigma": sigma,
                       "score_sigma": score_sigma, "sha256": digests[directory]})
    last = levels[-1]
    return {**{key: last[key] for key in ("prior_dir", "prior_sigma", "score_sigma", "sha256")},
            "sources": sources, "prior_sigmas": [level["sigma"] for level in levels], "levels": levels}


def sleep_bank(config, prior, sources, record):
    """The sleep phase's draws [sleep_draws, N, length] of the priors of ``sources``, or None without a sleep
    phase: a score prior's own draws, or a flow run's noiseless prior's (the model of clean sources, whatever
    level the ELBO steps use).
    Seeded by the run seed and kept in {experiment}/sleep_banks/ under a key of everything they depend on (the
    prior's sha256 included), so a resumed run or another posterior of the same priors reuses them."""
    post = config.posterior
    if post.sleep_steps == 0:
        return None
    crop = post.crop_length or config.data.crop_length
    length = post.sleep_draw_length or 2 * crop
    if length < crop or post.sleep_draws < 1:
        raise ConfigError(f"posterior.sleep_draws must be >= 1 and sleep_draw_length >= the crop ({crop}); got "
                          f"{post.sleep_draws}, {length}")
    # Every source of the run is drawn, whatever subset this posterior separates: draws are independent per
    # source, so sine + square reuses the four-source bank of the same seed instead of paying for its own.
    all_sources = list(config.data.sources)
    if hasattr(prior, "denoise"):
        key = {"prior_sha256": record["sha256"], "sources": all_sources, "draws": post.sleep_draws,
               "length": length, "steps": post.sleep_sampler_steps, "churn": post.sleep_churn, "seed": config.seed}

        def draw(generator):
            return sample_score_prior(prior.prior, post.sleep_draws, len(all_sources), length, generator,
                                      post.sleep_sampler_steps, post.sleep_churn)
    elif config.model.name == "flowavenet":
        if post.sleep_temperature <= 0:
            raise ConfigError(f"posterior.sleep_temperature must be positive, got {post.sleep_temperature}")
        directory = prior_dir(config, 0.0)
        if not is_done(directory):
            raise no_prior_error(config)
        key = {"prior_sha256": file_sha256(directory / "last.ckpt"), "sources": all_sources,
               "draws": post.sleep_draws, "length": length, "temperature": post.sleep_temperature,
               "seed": config.seed}

        def draw(generator):
            flow = load_prior(directory, all_sources, to_dict(config.model)).prior
            return sample_flow_prior(flow, post.sleep_draws, length, generator, post.sleep_temperature)
    else:
        raise ConfigError(f"posterior.sleep_steps needs priors that can be sampled: score or flow priors "
                          f"(experiment {config.experiment} has {config.model.name} priors); set sleep_steps=0")
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = experiment_dir(config) / "sleep_banks" / f"{digest}.pt"
    kept = [all_sources.index(source) for source in sources]
    if path.is_file():
        log.info("sleep bank: %s", path)
        return torch.load(path, weights_only=True)[:, kept]
    started = time.perf_counter()
    draws = draw(torch.Generator().manual_seed(config.seed + 7919))
    log.info("sleep bank: %d draws of %d samples per source in %.0f s -> %s", post.sleep_draws, length,
             time.perf_counter() - started, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: torch.save(draws, handle), binary=True)
    atomic_write_text(path.with_suffix(".json"), json.dumps(key, indent=2))
    return draws[:, kept]


def build_module(config, sources, record, schedule=True, sleep=False):
    """The posterior module with its frozen prior(s); ``schedule=False`` loads only the finest level (the
    finished posterior's use: validation and separation never see the coarser ones)."""
    loaded = {}

    def level(directory):  # each directory loaded once, however many levels it serves
        if directory not in loaded:
            prior = load_prior(directory, list(config.data.sources), to_dict(config.model)).prior
            loaded[directory] = SourceSubset(prior, list(config.data.sources), sources)
        return loaded[directory]

    prior, post = level(record["prior_dir"]), config.posterior
    bank = sleep_bank(config, prior, sources, record) if sleep else None
    prior_schedule = None
    if schedule and record.get("levels"):
        sigmas = [entry["sigma"] for entry in record["levels"]]
        if record["score_sigma"] is not None:
            prior_schedule = PriorSchedule(sigmas, post.max_steps, score_prior=prior)
        else:
            # The coarser levels load off the global RNG stream, so the posterior's initial weights are those of
            # a single-level run at the finest sigma (same seed): the two fits start from the same point.
            with torch.random.fork_rng(devices=[]):
                levels = [level(entry["prior_dir"]) for entry in record["levels"]]
            prior_schedule = PriorSchedule(sigmas, post.max_steps, levels=levels)
    alpha = mixing_weights(dataset_mixing(config.data.name), len(sources))
    sigma = record["prior_sigma"] if record["score_sigma"] is None else record["score_sigma"]
    return PosteriorModule(net={key: post[key] for key in NET_KEYS}, sources=sources, alpha=alpha.tolist(),
                           gamma=post.gamma, derived=post.derived, warmup_steps=post.warmup_steps, lr=post.lr,
                           lr_decay_times=post.lr_decay_times, schedule_steps=post.max_steps,
                           score_sigma=record["score_sigma"], seed=config.seed, prior_sigma=sigma,
                           sleep_steps=post.sleep_steps, prior=prior, schedule=prior_schedule, bank=bank)


def check_source(run_dir, record):
    """Refuse to continue (or use) a posterior whose frozen prior (any level of its schedule) changed since it
    was trained. A record without ``levels`` (single level, also every posterior from before schedules) is
    its own one level."""
    recorded = json.loads((Path(run_dir) / "posterior_source.json").read_text())
    if recorded.get("prior_sigmas") != record.get("prior_sigmas"):
        raise ValueError(f"the posterior in {run_dir} was trained with posterior.prior_sigmas="
                         f"{recorded.get('prior_sigmas')}, not {record.get('prior_sigmas')}; pass the same, or "
                         f"another posterior.name to train one for this schedule")
    before, now = recorded.get("levels") or [recorded], record.get("levels") or [record]
    changed = [(a, b) for a, b in zip(before, now) if a["sha256"] != b["sha256"] or a["prior_dir"] != b["prior_dir"]]
    if changed or len(before) != len(now):
        a, b = changed[0] if changed else (recorded, record)
        level = f" at sigma {b['sigma']:g}" if "sigma" in b else ""
        raise ValueError(f"the prior{level} of the posterior in {run_dir} changed since it was trained "
                         f"({a['prior_dir']} -> {b['prior_dir']}, or new weights); delete {run_dir} "
                         f"or pass another posterior.name to train one for the new prior")
    if recorded["sources"] != record["sources"]:
        raise ValueError(f"the posterior in {run_dir} separates {recorded['sources']}, not {record['sources']}")


def check_resume(config, sources):
    expected = {key: config.posterior[key] for key in NET_KEYS}

    derived = config.posterior.get("derived")

    def check(path, hparams):
        if hparams.get("sources") != sources or hparams.get("net") != expected:
            raise ValueError(f"checkpoint {path} is a posterior for {hparams.get('sources')} with "
                             f"{hparams.get('net')}, not this configuration ({sources}, {expected}); use its "
                             f"settings or another posterior.name")
        if hparams.get("derived") != derived:
            raise ValueError(f"checkpoint {path} was trained with posterior.derived={hparams.get('derived')}, not "
                             f"{derived}; use its setting or another posterior.name")
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
    module = build_module(config, sources, record, sleep=not is_done(run_dir))  # a finished run draws no bank
    datamodule = MixtureDataModule(base, module.alpha.tolist(), independent=config.data.name != "toy",
                                   batch_size=post.batch_size)
    if not is_done(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "posterior_source.json", json.dumps(record, indent=2))
    log.info("posterior for %s against the prior %s (sigma %g) into %s", sources, record["prior_dir"],
             record["prior_sigma"], run_dir)
    if record.get("levels"):
        log.info("coarse to fine over %d equal stages of %d steps: sigma %s", len(record["levels"]), post.max_steps,
                 record["prior_sigmas"])
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
    module = build_module(config, list(sources), record, schedule=False)
    state = read_checkpoint(run_dir / "last.ckpt")["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
    if missing or unexpected:
        raise ValueError(f"{run_dir / 'last.ckpt'} does not match the posterior network: missing {missing}, "
                         f"unexpected {unexpected}")
    checkpoint = run_dir / "last.ckpt"
    return module.eval(), {**record, "posterior_dir": str(run_dir), "posterior_sha256": file_sha256(checkpoint)}
