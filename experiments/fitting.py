"""Fitting one run folder: the loop every training command shares (noiseless priors, noise levels, the LQ-VAE's
two stages, the variational posterior), and the family's sources and data (per source, or pooled).

A rerun resumes from the run's ``last.ckpt`` (weights, optimizer, scheduler, step, RNG); a finished run
(``done.json``) is left alone.
"""
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks.atomic_checkpoint_io import read_checkpoint
from callbacks.denoiser_quality import DenoiserQualityReport
from callbacks.per_prior_early_stopping import PerPriorEarlyStopping
from callbacks.weight_ema import WeightEMA
from datamodules.pooled_sources import POOLED_SOURCE, PooledDataModule
from datamodules.registry import build_datamodule
from experiments.config import save_config, to_dict
from experiments.run_layout import check_compatible, is_done, mark_done
from experiments.trainer_factory import build_trainer, compile_prior, finish_loggers
from lightning_modules.prior_module import PriorModule, check_precision

log = logging.getLogger(__name__)


def family_sources(config, pooled=False):
    """The priors' source names: data.sources, or the one pooled prior's."""
    return [POOLED_SOURCE] if pooled else list(config.data.sources)


def family_data(config, pooled=False):
    """The config's datamodule, with every source pooled into one for the pooled prior (None: fit builds it)."""
    if not pooled:
        return None
    return PooledDataModule(build_datamodule(config.data, seed=config.seed, output_root=config.output_root))


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
    if isinstance(module, PriorModule):  # before anything is written: fp16 would couple the grouped priors
        check_precision(config.trainer.precision, len(module.sources))
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
    ema_decay = getattr(getattr(module, "prior", None), "weight_ema_decay", None)
    if ema_decay:
        callbacks.append(WeightEMA(ema_decay))
    if hasattr(getattr(module, "prior", None), "denoise"):  # after the EMA: it reports the averaged weights
        callbacks.append(DenoiserQualityReport(module.sources, run_dir))
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
