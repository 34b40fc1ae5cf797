"""Training of the noiseless priors and their noise fine-tuning (paper 003 section 3.3; paper 004 section 3.5).

Rerunning an interrupted command resumes from the run's ``last.ckpt`` (weights, optimizer, scheduler,
step, RNG); a finished run (``done.json``) is left alone.
"""
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks.atomic_checkpoint_io import read_checkpoint
from callbacks.per_prior_early_stopping import PerPriorEarlyStopping
from datamodules.pooled_sources import POOLED_SOURCE, PooledDataModule
from datamodules.registry import build_datamodule
from experiments.config import save_config, to_dict
from experiments.run_layout import (
    PAPER003_SIGMAS, basis_sigmas, check_compatible, is_done, mark_done, prior_dir,
)
from experiments.trainer_factory import build_trainer, compile_prior, finish_loggers
from lightning_modules.prior_module import PriorModule
from lightning_modules.prior_registry import is_noise_conditional

log = logging.getLogger(__name__)


def family_sources(config, pooled=False):
    """The priors' source names: data.sources, or the one pooled prior's."""
    return [POOLED_SOURCE] if pooled else list(config.data.sources)


def family_data(config, pooled=False):
    """The config's datamodule, with every source pooled into one for the pooled prior (None: fit builds it)."""
    if not pooled:
        return None
    return PooledDataModule(build_datamodule(config.data, seed=config.seed, output_root=config.output_root))


def train_noiseless(config, pooled=False):
    """The noiseless per-source priors, or (``pooled``) one prior of the same family on every source pooled."""
    if config.model.name == "lqvae":
        from experiments.train_lqvae import train_both

        return train_both(config, pooled)  # stage 1 (the LQ-VAE), then stage 2 (its latent priors)
    run_dir = prior_dir(config, 0.0, pooled=pooled)
    module = PriorModule(
        model=to_dict(config.model), sources=family_sources(config, pooled), lr=config.optim.lr,
        lr_decay=config.optim.lr_decay, lr_decay_times=config.optim.lr_decay_times,
        schedule_steps=config.trainer.max_steps, noise_sigma=0.0, seed=config.seed,
    )
    return fit(config, run_dir, module, config.trainer.max_steps, config.trainer.val_check_interval,
               job_type="train", early_stopping=False, datamodule=family_data(config, pooled),
               extra={"pooled_sources": list(config.data.sources)} if pooled else None)


def finetune(config, sigma, init_dir=None, grid="paper003", pooled=False):
    """Continue from the noiseless prior (or ``init_dir``) on x + N(0, sigma^2), until every prior's
    validation likelihood stops improving or ``finetune.max_steps``; each prior keeps its best weights.
    The result goes to ``grid``'s layout."""
    if config.model.name == "lqvae":
        raise ValueError("the LQ-VAE family's priors model discrete codes: noise fine-tuning does not apply; "
                         "its one noiseless run (make train-toy-lqvae) is the model")
    init_dir = Path(init_dir) if init_dir else prior_dir(config, 0.0, pooled=pooled)
    if not is_done(init_dir):
        command = "train-pooled" if pooled else "train"
        raise FileNotFoundError(
            f"no finished prior to fine-tune from at {init_dir}; run the training first "
            f"(make {command} EXPERIMENT={config.experiment} PRESET={config.preset}) or finish the previous noise level"
        )
    run_dir = prior_dir(config, sigma, grid, pooled=pooled)
    sources = family_sources(config, pooled)
    module = PriorModule(
        model=to_dict(config.model), sources=sources, lr=config.finetune.lr,
        lr_decay_times=0, schedule_steps=config.finetune.max_steps, noise_sigma=sigma, seed=config.seed,
    )
    if not (run_dir / "last.ckpt").is_file():
        checkpoint = read_checkpoint(init_dir / "last.ckpt")
        check_compatible(init_dir / "last.ckpt", checkpoint["hyper_parameters"], sources, to_dict(config.model))
        module.load_state_dict(checkpoint["state_dict"])
    extra = {"init_from": str(init_dir), "grid": grid}
    if pooled:
        extra["pooled_sources"] = list(config.data.sources)
    return fit(config, run_dir, module, config.finetune.max_steps, config.finetune.val_check_interval,
               job_type="finetune", early_stopping=True, extra=extra, datamodule=family_data(config, pooled))


def finetune_grid(config, pooled=False):
    """paper003: each level from the noiseless prior; basis: serially, each from its smaller neighbour.
    A noise-conditional family (score priors) has nothing to fine-tune: its one network serves every level."""
    if is_noise_conditional(to_dict(config.model)) or config.model.name == "lqvae":
        log.info("%s: %s priors need no noise fine-tuning; nothing to do", config.experiment, config.model.name)
        return []
    if config.finetune.grid == "paper003":
        return [finetune(config, sigma, pooled=pooled) for sigma in PAPER003_SIGMAS]
    if config.finetune.grid == "basis":
        results, previous = [], None
        for sigma in basis_sigmas():
            results.append(finetune(config, sigma, init_dir=previous, grid="basis", pooled=pooled))
            previous = prior_dir(config, sigma, "basis", pooled=pooled)
        return results
    raise ValueError(f"unknown finetune.grid {config.finetune.grid!r}; choose 'paper003' or 'basis'")


def keep_metrics_history(run_dir):
    """Lightning's CSV logger starts logs/metrics.csv afresh when a run resumes: keep the earlier rows beside it
    (metrics_part0.csv, metrics_part1.csv, ... in order)."""
    metrics = Path(run_dir) / "logs" / "metrics.csv"
    if metrics.is_file():
        metrics.rename(metrics.with_name(f"metrics_part{len(list(metrics.parent.glob('metrics_part*.csv')))}.csv"))


def fit(config, run_dir, module, max_steps, val_check_interval, job_type, early_stopping, extra=None,
        datamodule=None, check_resume=None):
    """Train ``module`` into ``run_dir`` (resuming its last.ckpt). ``datamodule``: None = the config's data;
    ``check_resume(path, hparams)`` refuses a checkpoint of another configuration (default: a prior's)."""
    run_dir = Path(run_dir)
    if is_done(run_dir):
        log.warning("%s is already finished (done.json); delete it to retrain", run_dir)
        return run_dir
    resume = run_dir / "last.ckpt"
    if resume.is_file():
        hparams = read_checkpoint(resume)["hyper_parameters"]
        if check_resume is not None:
            check_resume(resume, hparams)
        else:
            check_compatible(resume, hparams, list(module.sources), to_dict(config.model))
        keep_metrics_history(run_dir)  # only once the resume is accepted: a refused one leaves the logs as they were
    pl.seed_everything(config.seed, workers=True)
    # Data first: a bad dataset root stops here, before anything is written.
    if datamodule is None:
        datamodule = build_datamodule(config.data, seed=config.seed, output_root=config.output_root)
    datamodule.setup("fit")
    save_config(config, run_dir / "config.yaml")
    callbacks = [ModelCheckpoint(dirpath=str(run_dir), filename="last", save_top_k=0, save_last=True,
                                 every_n_train_steps=config.trainer.checkpoint_every_n_steps)]
    stopper = PerPriorEarlyStopping(list(module.sources), config.finetune.patience) if early_stopping else None
    if stopper:
        callbacks.append(stopper)
    trainer = build_trainer(config, run_dir, job_type, callbacks, max_steps, val_check_interval)
    if config.trainer.compile:
        compile_prior(module)
    started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume.is_file() else None,
                weights_only=True)
    if trainer.interrupted:
        raise KeyboardInterrupt(f"training of {run_dir} was interrupted; rerun the same command to resume")
    if stopper:
        # The finished run holds every prior at its own best validation step, not the last weights.
        stopper.restore_best(module)
        extra = {**(extra or {}), "best": stopper.summary()}
    trainer.save_checkpoint(str(resume), weights_only=False)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        info = {"global_step": trainer.global_step, "seconds_this_session": time.time() - started,
                "skipped_steps": module.skipped_steps}
        if hasattr(module, "noise_sigma"):  # a prior's; the posterior has none
            info["noise_sigma"] = module.noise_sigma
        if hasattr(module, "skipped_per_prior"):
            info["skipped_steps_per_prior"] = dict(zip(module.sources, module.skipped_per_prior))
        mark_done(run_dir, {**info, "seed": config.seed, "metrics": metrics, **(extra or {})})
    finish_loggers(trainer)
    return run_dir
